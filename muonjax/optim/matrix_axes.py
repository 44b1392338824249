"""How Muon reads a parameter as a matrix, or as a stack of matrices.

The rule for a bare pytree leaf: its matrix is its last two axes, (fan_in,
fan_out), and any leading axes index a stack of independent matrices, each
orthogonalized on its own. That is how scanned layers (layers, D, F) and
expert stacks (experts, D, F) are read. A (3, 3, Cin, Cout) conv kernel is
therefore read as nine per-tap (Cin, Cout) matrices and an attention kernel
(embed, heads, head_dim) as `embed` separate (heads, head_dim) matrices, unless
you say otherwise:

- For Flax NNX models, `muonjax.nnx_matrix_axes(model)` knows the layout of
  each kernel from its module (Linear, LinearGeneral, MultiHeadAttention,
  Conv, Einsum) and keeps leading axes added by `nnx.vmap` / `nnx.scan` as
  stack axes.
- For any other layout, describe the leaf by a `MatrixAxes`, returned for it
  by a function of its path and value:

    def matrix_axes(path, leaf):
        if "qkv" in jax.tree_util.keystr(path):
            return muonjax.MatrixAxes(rows=(-3,), cols=(-2, -1))
        return None  # the default: last two axes

    tx = muonjax.muon(1e-3, matrix_axes=matrix_axes)

A per-leaf function stays valid inside `optax.partition`, which hands each
branch a tree with the other branch's leaves masked out.

Muon needs real floating-point leaves with at least two axes; axes must lie in
[-ndim, ndim). Anything else is a ValueError naming the leaf, never a silent
reinterpretation (no wrapping of axes, no dropped imaginary parts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class MatrixAxes(NamedTuple):
    """The axes that form a leaf's matrix; all other axes index a stack.

    rows: axes flattened into the matrix's rows (fan-in), in order.
    cols: axes flattened into the matrix's columns (fan-out), in order.
    """

    rows: int | Sequence[int]
    cols: int | Sequence[int]


MatrixAxesFn = Callable[[Any, jax.Array], MatrixAxes | None]


def _normalize(axes: int | Sequence[int], shape: Sequence[int], where: str) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    ndim = len(shape)
    bad = tuple(a for a in axes if not -ndim <= a < ndim)
    if bad:
        raise ValueError(
            f"MatrixAxes for {where} of shape {tuple(shape)} name axes {bad} out of "
            f"range; valid axes are -{ndim} to {ndim - 1}."
        )
    return tuple(a % ndim for a in axes)


def _check_dtype(dtype: Any, where: str) -> None:
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"Muon needs real floating-point arrays, but {where} has dtype {dtype}. "
            "Complex or integer parameters cannot be orthogonalized as real "
            "matrices; split a complex one into real and imaginary parts, or route "
            "it to another optimizer with optax.partition."
        )


class MatrixView(NamedTuple):
    """A leaf reshaped to (*stack, A, B), and the way back."""

    perm: tuple[int, ...]  # transpose to (stack..., rows..., cols...)
    shape: tuple[int, ...]  # (*stack, A, B)
    split_shape: tuple[int, ...]  # (*stack, *row_dims, *col_dims)

    @property
    def rows_cols(self) -> tuple[int, int]:
        return self.shape[-2], self.shape[-1]

    def to_matrix(self, x: jax.Array) -> jax.Array:
        if self.perm != tuple(range(x.ndim)):
            x = x.transpose(self.perm)
        return x.reshape(self.shape)

    def from_matrix(self, x: jax.Array) -> jax.Array:
        x = x.reshape(self.split_shape)
        if self.perm != tuple(range(x.ndim)):
            x = x.transpose(_inverse(self.perm))
        return x


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def matrix_view(shape: Sequence[int], axes: MatrixAxes | None, where: str = "leaf") -> MatrixView:
    """The view of an array of `shape` as a stack of matrices given by `axes`."""
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"Muon orthogonalizes matrices and stacks of matrices, but {where} "
            f"has shape {tuple(shape)}. Route vectors and scalars (norm "
            "scales, biases) to AdamW, e.g. with muonjax.moonlight or "
            "optax.partition."
        )
    if axes is None:
        axes = MatrixAxes(rows=-2, cols=-1)
    elif not isinstance(axes, MatrixAxes):
        raise TypeError(
            f"matrix_axes must return MatrixAxes or None, got {axes!r} for {where}: "
            "write MatrixAxes(rows=..., cols=...)"
        )
    rows, cols = _normalize(axes.rows, shape, where), _normalize(axes.cols, shape, where)
    if not rows or not cols or len(set(rows + cols)) != len(rows + cols):
        raise ValueError(
            f"MatrixAxes for {where} of shape {tuple(shape)} must name "
            f"distinct, non-empty row and column axes, got {axes}."
        )
    stack = tuple(a for a in range(ndim) if a not in rows + cols)
    perm = stack + rows + cols
    stack_dims = tuple(shape[a] for a in stack)
    row_dims = tuple(shape[a] for a in rows)
    col_dims = tuple(shape[a] for a in cols)
    return MatrixView(
        perm=perm,
        shape=stack_dims + (math.prod(row_dims), math.prod(col_dims)),
        split_shape=stack_dims + row_dims + col_dims,
    )


def map_matrices(
    fn: Callable[..., Any],
    matrix_axes: MatrixAxesFn | None,
    tree: Any,
    *rest: Any,
) -> Any:
    """tree_map of fn(path, view, leaf, *rest_leaves) with each leaf's MatrixView.

    Raises ValueError naming the leaf if it is not a real floating-point array
    or its `MatrixAxes` do not fit its shape.
    """

    def per_leaf(path, leaf, *others):
        where = f"the leaf at {jax.tree_util.keystr(path) or '<root>'}"
        _check_dtype(leaf.dtype, where)
        axes = None if matrix_axes is None else matrix_axes(path, leaf)
        return fn(path, matrix_view(leaf.shape, axes, where), leaf, *others)

    return jax.tree_util.tree_map_with_path(per_leaf, tree, *rest)
