"""What Muon would do to each leaf: its group, matrix, update scale and Newton-Schulz cost.

    print(muonjax.routing_table(params))           # arrays, or jax.eval_shape output

prints one line per leaf and a totals line, without running anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from muonjax.optim.matrix_axes import MatrixAxesFn, matrix_view
from muonjax.optim.muon import check_update_scale, shape_scale
from muonjax.optim.newton_schulz import newton_schulz_flops
from muonjax.optim.paths import path_names
from muonjax.optim.recipes import MUON, moonlight_labels


class LeafInfo(NamedTuple):
    """One leaf of the params, as `moonlight` would treat it."""

    path: str  # keys joined by "/", e.g. "layers/attn/kernel" (an nnx.State's .value dropped)
    shape: tuple[int, ...]
    dtype: str
    group: str  # "muon" or "adamw"
    size: int  # number of entries
    matrix: tuple[int, int] | None  # Muon: (A, B) = (fan_in, fan_out) of each matrix
    stack: int | None  # Muon: how many (A, B) matrices the leaf holds
    scale: float | str | None  # Muon: factor applied to O ("update_norm": a formula)
    ns_flops: int  # Muon: matmul FLOPs of Newton-Schulz per step; 0 for AdamW


class RoutingTable(list):
    """A list of `LeafInfo`, one per leaf, that prints as an aligned table."""

    def __str__(self) -> str:
        return format_table(self)


def _path_str(path: Any) -> str:
    return "/".join(path_names(path)) or "<root>"


def _scale(rule: str, view, rms_scale: float, hidden_size: int | None) -> float | str:
    if rule == "update_norm":  # depends on the update itself
        return f"{rms_scale:g}/RMS(O)"
    return shape_scale(rule, view, rms_scale, hidden_size)


def routing_table(
    params: Any,
    *,
    labels: Any | Callable[[Any], Any] | None = None,
    matrix_axes: MatrixAxesFn | None = None,
    rms_scale: float = 0.2,
    update_scale: str = "moonlight",
    hidden_size: int | None = None,
    ns_steps: int = 5,
) -> RoutingTable:
    """How `moonlight` routes and scales each leaf of `params`, as a table.

    For a leaf routed to Muon, with matrices of shape (A, B) (the last two
    axes, or `matrix_axes`) and `stack` of them, the update-scale factor is,
    by `update_scale` (paper Sec. 3.1, see `scale_by_shape`):

      "moonlight"    rms_scale * sqrt(max(A, B))    Eq. 7
      "hidden"       rms_scale * sqrt(hidden_size)  Eq. 5
      "update_norm"  rms_scale / RMS(O)             Eq. 6 (shown as a formula)
      "jordan"       sqrt(max(1, B / A))

    and the Newton-Schulz cost is `newton_schulz_flops((stack, A, B), ns_steps)`.
    Nothing is computed on the values: `jax.ShapeDtypeStruct` leaves (the
    output of `jax.eval_shape` or `nnx.eval_shape`) work as well as arrays.

    Args:
      params: a pytree of arrays or `jax.ShapeDtypeStruct`s (nested dicts,
        `nnx.State`, ...).
      labels: as `moonlight`'s: a function of the params returning a tree of
        "muon" / "adamw", or such a tree; None means `moonlight_labels`.
      matrix_axes: as `moonlight`'s: `(path, leaf) -> MatrixAxes | None`.
      rms_scale: as `moonlight`'s.
      update_scale: as `moonlight`'s, one of `UPDATE_SCALE_RULES`.
      hidden_size: the model width H, required by update_scale="hidden".
      ns_steps: Newton-Schulz iterations, for the FLOPs.

    Returns:
      A `RoutingTable`: a list of `LeafInfo`, one per leaf in tree order, whose
      `str` is an aligned table with a totals line (`print` it).

    Raises:
      ValueError: for an unknown `update_scale`, "hidden" without
        `hidden_size`, or a leaf labelled "muon" that is not a matrix or a
        stack of matrices (as `moonlight` would at init).

    References:
      Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982 (2025).
    """
    check_update_scale(update_scale, hidden_size)
    if labels is None:
        labels = moonlight_labels
    label_tree = labels(params) if callable(labels) else labels
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    # A labels tree may be a prefix of the params (as optax.partition allows).
    groups = jax.tree.leaves(
        jax.tree.map(lambda g, sub: jax.tree.map(lambda _: g, sub), label_tree, params)
    )
    if len(groups) != len(leaves):
        raise ValueError(
            f"labels give {len(groups)} labels for {len(leaves)} leaves; they must be "
            "a tree like the params (or a prefix of it) of 'muon' / 'adamw'."
        )
    rows = RoutingTable()
    for (path, leaf), group in zip(leaves, groups):
        shape = tuple(int(d) for d in np.shape(leaf))
        dtype = str(np.dtype(leaf.dtype)) if hasattr(leaf, "dtype") else str(np.asarray(leaf).dtype)
        size = math.prod(shape)
        if group != MUON:
            rows.append(LeafInfo(_path_str(path), shape, dtype, group, size, None, None, None, 0))
            continue
        axes = None if matrix_axes is None else matrix_axes(path, leaf)
        where = f"the leaf at {jax.tree_util.keystr(path) or '<root>'}"
        view = matrix_view(shape, axes, where)
        rows.append(
            LeafInfo(
                path=_path_str(path),
                shape=shape,
                dtype=dtype,
                group=group,
                size=size,
                matrix=view.rows_cols,
                stack=math.prod(view.shape[:-2]),
                scale=_scale(update_scale, view, rms_scale, hidden_size),
                ns_flops=newton_schulz_flops(view.shape, ns_steps),
            )
        )
    return rows


def _si(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def format_table(rows: list[LeafInfo]) -> str:
    """An aligned text table of `routing_table`'s rows, with a totals line.

    Args:
      rows: `LeafInfo`s, as `routing_table` returns them.

    Returns:
      The table as one string: a header, one line per leaf (AdamW leaves show
      "-" for the Muon-only columns), and a totals line: leaves and params in
      all and in the Muon group, and Newton-Schulz FLOPs per step.

    References:
      Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982 (2025).
    """
    header = ("path", "shape", "dtype", "group", "params", "matrix", "stack", "scale", "NS FLOPs")
    lines = [header]
    for r in rows:
        muon = r.group == MUON
        if isinstance(r.scale, float):
            scale = f"{r.scale:.4g}"
        else:
            scale = r.scale if muon else "-"
        lines.append(
            (
                r.path,
                str(tuple(r.shape)),
                r.dtype,
                r.group,
                _si(r.size),
                f"{r.matrix[0]}x{r.matrix[1]}" if muon else "-",
                str(r.stack) if muon else "-",
                scale,
                _si(r.ns_flops) if muon else "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {"params", "stack", "scale", "NS FLOPs"}

    def fmt(line):
        cells = [
            c.rjust(w) if name in right else c.ljust(w) for c, w, name in zip(line, widths, header)
        ]
        return "  ".join(cells).rstrip()

    total = sum(r.size for r in rows)
    muon_rows = [r for r in rows if r.group == MUON]
    muon_size = sum(r.size for r in muon_rows)
    share = f" ({100 * muon_size / total:.1f}%)" if total else ""
    totals = (
        f"total: {len(rows)} leaves, {total:,} params; muon {len(muon_rows)} leaves, "
        f"{muon_size:,} params{share}, {_si(sum(r.ns_flops for r in muon_rows))} "
        "Newton-Schulz FLOPs per step"
    )
    out = [fmt(lines[0]), fmt(tuple("-" * w for w in widths)), *map(fmt, lines[1:])]
    return "\n".join([*out, totals])
