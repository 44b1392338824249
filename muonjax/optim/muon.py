"""Muon as optax gradient transformations (paper Eq. 1-4)."""

from __future__ import annotations

import numbers
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


def _scale_moonlight(view, u, rms_scale, hidden_size):
    return u * (rms_scale * max(view.rows_cols) ** 0.5)


def _scale_hidden(view, u, rms_scale, hidden_size):
    return u * (rms_scale * hidden_size**0.5)


def _scale_update_norm(view, u, rms_scale, hidden_size):
    # RMS per matrix of the stack, in (at least) float32 so bfloat16 updates
    # are not normalized by a rounded sum; the floor keeps a zero update zero.
    dtype = jnp.promote_types(u.dtype, jnp.float32)
    o = view.to_matrix(u).astype(dtype)
    rms = jnp.sqrt(jnp.mean(jnp.square(o), axis=(-2, -1), keepdims=True))
    rms = jnp.maximum(rms, jnp.finfo(dtype).tiny)
    return view.from_matrix(o * (rms_scale / rms))


def _scale_jordan(view, u, rms_scale, hidden_size):
    fan_in, fan_out = view.rows_cols
    return u * max(1.0, fan_out / fan_in) ** 0.5


_SCALE_BY_RULE = {
    "moonlight": _scale_moonlight,
    "hidden": _scale_hidden,
    "update_norm": _scale_update_norm,
    "jordan": _scale_jordan,
}
# Update-scale rules of paper Sec. 3.1 (Table 1), plus Keller Jordan's original.
UPDATE_SCALE_RULES = tuple(_SCALE_BY_RULE)


def _check_update_scale(rule: str, hidden_size: Any) -> None:
    if rule not in _SCALE_BY_RULE:
        raise ValueError(
            f"Unknown update scale rule {rule!r}; valid rules: {', '.join(UPDATE_SCALE_RULES)}."
        )
    if rule == "hidden":
        if hidden_size is None:
            raise ValueError(
                "The 'hidden' update scale rule (paper Eq. 5) needs hidden_size, "
                "the model width H; got hidden_size=None."
            )
        # A traced value (optax.inject_hyperparams) cannot be checked here.
        if isinstance(hidden_size, numbers.Real) and hidden_size < 1:
            raise ValueError(f"hidden_size must be at least 1, got {hidden_size!r}.")


def scale_by_shape(
    *,
    rms_scale: float = 0.2,
    rule: str = "moonlight",
    hidden_size: int | None = None,
    matrix_axes: MatrixAxesFn | None = None,
) -> optax.GradientTransformation:
    """Scales each matrix's update to a target RMS, by one of the rules of Sec. 3.1.

    For each (A, B) = (fan_in, fan_out) matrix U of a leaf (a stack's
    matrices each on their own), by `rule`:

      "moonlight"    U * rms_scale * sqrt(max(A, B))   Eq. 7 "Adjusted LR" (Eq. 4)
      "hidden"       U * rms_scale * sqrt(hidden_size) Eq. 5 "Baseline"
      "update_norm"  U * rms_scale / RMS(U)            Eq. 6 "Update Norm"
      "jordan"       U * sqrt(max(1, B / A))           Keller Jordan's Muon

    An orthogonal A x B matrix has RMS 1 / sqrt(max(A, B)), so "moonlight"
    makes the update RMS about `rms_scale` whatever the shape, matching
    AdamW's (Sec. 2.2); "update_norm" makes it exactly `rms_scale` (RMS over
    the matrix's A * B entries, in float32); "hidden" uses one factor for
    every matrix, H being the model width (`hidden_size`, required). "jordan"
    is max(1, size(-2) / size(-1)) ** 0.5 of PyTorch's (out, in) layout, i.e.
    sqrt(max(1, fan_out / fan_in)); it ignores `rms_scale`, so pair it with
    Muon's own (larger) learning rate, not AdamW's.
    """
    _check_update_scale(rule, hidden_size)
    scale_rule = _SCALE_BY_RULE[rule]

    def update_fn(updates, state, params=None):
        del params

        def scale(path, view, u):
            return scale_rule(view, u, rms_scale, hidden_size).astype(u.dtype)

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
    update_scale: str = "moonlight",
    hidden_size: int | None = None,
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

    Args:
      update_scale: how O is scaled, one of `UPDATE_SCALE_RULES` (see
        `scale_by_shape`): "moonlight" (Eq. 7, the default above), "hidden"
        (Eq. 5, needs `hidden_size`), "update_norm" (Eq. 6) or "jordan".
      hidden_size: the model width H, for update_scale="hidden".
      compute_dtype: dtype of the Newton-Schulz iterations (float32 or bfloat16).
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
        scale_by_shape(
            rms_scale=rms_scale,
            rule=update_scale,
            hidden_size=hidden_size,
            matrix_axes=matrix_axes,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
