"""Muon as optax gradient transformations (paper Eq. 1-4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from muonjax.optim.matrix_axes import MatrixAxesFn, map_matrices
from muonjax.optim.newton_schulz import (
    CoefficientsLike,
    orthogonalize,
    resolve_coefficients,
)

# (path, N, orthogonalize) -> O: runs `orthogonalize` on N (leaf layout) wherever it likes
OrthogonalizeWith = Callable[[Any, jax.Array, Callable[[jax.Array], jax.Array]], jax.Array]


class ScaleByMuonState(NamedTuple):
    """State of `scale_by_muon`."""

    momentum: optax.Updates  # like params: same shapes, dtype mu_dtype or the param's


def scale_by_muon(
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: CoefficientsLike = "jordan",
    eps: float = 1e-7,
    mu_dtype: Any | None = None,
    matrix_axes: MatrixAxesFn | None = None,
    compute_dtype: Any = "float32",
    orthogonalize_with: OrthogonalizeWith | None = None,
) -> optax.GradientTransformation:
    """Orthogonalized momentum: O = NewtonSchulz(N), paper Eq. 1-2.

    M <- momentum * M + G; N = G + momentum * M (Nesterov) or N = M; each
    matrix of N is orthogonalized on its own (see `orthogonalize`). Every leaf
    must be a matrix or a stack of matrices (last two axes, or `matrix_axes`).

    `orthogonalize_with(path, N, orthogonalize)` may decide where each stack
    is orthogonalized: it gets N in the leaf's layout and a function that
    orthogonalizes such an array, and returns the result (e.g. after placing
    N on a mesh so that each device orthogonalizes only its own matrices;
    muonjax.parallel.Plan.orthogonalize does this for Distributed Muon).
    """
    resolve_coefficients(ns_coeffs, ns_steps)  # fail at construction, not in jit
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params):
        map_matrices(lambda path, view, p: None, matrix_axes, params)  # shape check
        return ScaleByMuonState(
            momentum=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params)
        )

    def update_fn(updates, state, params=None):
        del params
        new_momentum = jax.tree.map(
            lambda m, g: (momentum * m + g).astype(m.dtype), state.momentum, updates
        )

        def direction(path, view, g, m):
            n = g + momentum * m if nesterov else m  # in the wider of both dtypes

            def orthogonalize_leaf(x):  # x: an array laid out like n
                o = orthogonalize(
                    view.to_matrix(x),
                    ns_steps=ns_steps,
                    ns_coeffs=ns_coeffs,
                    eps=eps,
                    compute_dtype=compute_dtype,
                )
                return view.from_matrix(o)

            if orthogonalize_with is None:
                return orthogonalize_leaf(n).astype(g.dtype)
            return orthogonalize_with(path, n, orthogonalize_leaf).astype(g.dtype)

        directions = map_matrices(direction, matrix_axes, updates, new_momentum)
        return directions, ScaleByMuonState(momentum=new_momentum)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_shape(
    *, rms_scale: float = 0.2, matrix_axes: MatrixAxesFn | None = None
) -> optax.GradientTransformation:
    """Multiplies each matrix's update by rms_scale * sqrt(max(A, B)), Eq. 4.

    An orthogonal A x B matrix has RMS 1 / sqrt(max(A, B)); this makes the
    update RMS about `rms_scale` whatever the shape, matching AdamW's (Sec. 2.2).
    """

    def update_fn(updates, state, params=None):
        del params

        def scale(path, view, u):
            return (u * (rms_scale * max(view.rows_cols) ** 0.5)).astype(u.dtype)

        return map_matrices(scale, matrix_axes, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: CoefficientsLike = "jordan",
    rms_scale: float = 0.2,
    eps: float = 1e-7,
    mu_dtype: Any | None = None,
    matrix_axes: MatrixAxesFn | None = None,
    compute_dtype: Any = "float32",
    orthogonalize_with: OrthogonalizeWith | None = None,
) -> optax.GradientTransformation:
    """Moonlight's Muon for matrices: W <- W - lr (rms_scale sqrt(max(A,B)) O + wd W).

    Paper Eq. 4: orthogonalized Nesterov momentum, scaled to an update RMS of
    about `rms_scale`, with decoupled weight decay, times the learning rate
    (a float or an optax schedule). Every leaf must be a matrix or a stack of
    matrices; for a whole model use `moonlight`.
    """
    return optax.chain(
        scale_by_muon(
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coeffs=ns_coeffs,
            eps=eps,
            mu_dtype=mu_dtype,
            matrix_axes=matrix_axes,
            compute_dtype=compute_dtype,
            orthogonalize_with=orthogonalize_with,
        ),
        scale_by_shape(rms_scale=rms_scale, matrix_axes=matrix_axes),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
