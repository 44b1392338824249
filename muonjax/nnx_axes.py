"""Muon's matrix view of each kernel of a Flax NNX model, read from its module.

Muon's default reads a leaf's last two axes as the matrix. That is right for
`nnx.Linear` (in, out) but not for kernels whose matrix spans more axes: a
`nnx.MultiHeadAttention` query kernel (embed, heads, head_dim) is one
(embed, heads * head_dim) matrix, a `nnx.Conv` kernel (3, 3, Cin, Cout) one
(3 * 3 * Cin, Cout) matrix. `nnx_matrix_axes(model)` knows these layouts.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from muonjax.optim.matrix_axes import MatrixAxes, MatrixAxesFn
from muonjax.optim.paths import path_names


def _axes(rows: range, cols: range) -> MatrixAxes:
    return MatrixAxes(rows=tuple(rows), cols=tuple(cols))


def _linear_general(m: nnx.LinearGeneral) -> MatrixAxes:
    # kernel (*batch_axis, *in_features, *out_features); batch_axis dims are a stack
    n_in, n_out = len(m.in_features), len(m.out_features)
    return _axes(range(-n_in - n_out, -n_out), range(-n_out, 0))


def _conv(m: nnx.Conv | nnx.ConvTranspose) -> MatrixAxes:
    # kernel (*kernel_size, Cin / groups, Cout): rows = taps x input channels
    n = len(m.kernel_size)
    if getattr(m, "transpose_kernel", False):  # (*kernel_size, Cout, Cin)
        return MatrixAxes(rows=(*range(-n - 2, -2), -1), cols=(-2,))
    return _axes(range(-n - 2, -1), range(-1, 0))


def _einsum(m: nnx.Einsum) -> MatrixAxes | None:
    # "lhs,rhs->out", rhs the kernel: its letters contracted with the input are
    # the rows, those only in the output the columns, those in both (e.g. a
    # per-head batch) a stack. Ellipses, repeated or summed-out letters: default.
    inputs, out = m.einsum_str.split("->")
    lhs, rhs = inputs.split(",")
    if "." in rhs or len(set(rhs)) != len(rhs):
        return None
    rows = tuple(i - len(rhs) for i, c in enumerate(rhs) if c in lhs and c not in out)
    cols = tuple(i - len(rhs) for i, c in enumerate(rhs) if c in out and c not in lhs)
    if not rows or not cols or any(c not in lhs and c not in out for c in rhs):
        return None
    return MatrixAxes(rows=rows, cols=cols)


_KERNEL_AXES = {
    nnx.Linear: lambda m: MatrixAxes(rows=-2, cols=-1),  # (in, out): the default
    nnx.LinearGeneral: _linear_general,  # and so MultiHeadAttention's q/k/v/out
    nnx.Conv: _conv,
    nnx.ConvTranspose: _conv,
    nnx.Einsum: _einsum,
}


def nnx_matrix_axes(model: nnx.Module) -> MatrixAxesFn:
    """The `matrix_axes` function that reads each kernel of `model` as its module does.

    For each `kernel` of a known module type, the matrix is (fan_in, fan_out):

      nnx.Linear           (in, out)
      nnx.LinearGeneral    (*batch, *in_features, *out_features) ->
                           (prod(in_features), prod(out_features)), batch a stack;
                           so nnx.MultiHeadAttention's query/key/value
                           (embed, heads, head_dim) -> (embed, heads * head_dim)
                           and out (heads, head_dim, embed) -> (heads * head_dim, embed)
      nnx.Conv             (*kernel_size, Cin / groups, Cout) ->
                           (prod(kernel_size) * Cin / groups, Cout)
      nnx.ConvTranspose    as Conv (Cin and Cout swapped with transpose_kernel)
      nnx.Einsum           rows = kernel axes contracted with the input, cols =
                           kernel axes only in the output, axes in both a stack;
                           einsum strings with an ellipsis get the default

    The rule's axes are counted from the end, so leading axes that
    `nnx.vmap` / `nnx.scan` add to stacked layers stay stack axes. Every
    other leaf (biases, norms, embeddings, kernels of other modules) gets None,
    the default rule: last two axes, leading axes a stack.

    Args:
      model: the NNX module whose parameters are optimized. Paths are matched
        from this module, so pass the same module whose state you hand to the
        optimizer: `nnx.state(model, nnx.Param)` (paths like
        ('att', 'query', 'kernel', .value)), its pure-dict form or
        `nnx.Optimizer(model, tx, wrt=nnx.Param)` (paths without the trailing
        `.value`). The layout is read now; build it again if the model's
        structure changes.

    Returns:
      A function (path, leaf) -> MatrixAxes | None for `muonjax.muon`,
      `muonjax.moonlight` or `muonjax.scale_by_muon`'s `matrix_axes`; it also
      works inside `optax.partition`, which hands it the same paths.

    Example:
      >>> model = nnx.MultiHeadAttention(num_heads=4, in_features=16, decode=False,
      ...                                rngs=nnx.Rngs(0))
      >>> tx = muonjax.moonlight(1e-3, matrix_axes=nnx_matrix_axes(model))
      >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(
            "nnx_matrix_axes needs the nnx.Module itself (its module types give "
            f"each kernel's layout), got {type(model).__name__}."
        )
    table: dict[tuple[str, ...], MatrixAxes | None] = {}  # path names as strings
    for path, module in nnx.iter_modules(model):
        for module_type, rule in _KERNEL_AXES.items():
            if isinstance(module, module_type) and isinstance(
                getattr(module, "kernel", None), nnx.Param
            ):
                table[(*map(str, path), "kernel")] = rule(module)
                break

    def matrix_axes(path: Any, leaf: Any) -> MatrixAxes | None:
        del leaf
        return table.get(path_names(path))

    return matrix_axes
