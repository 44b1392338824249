"""Distributed Muon by ownership: each device orthogonalizes whole matrices of its own.

Newton-Schulz needs whole matrices. Left to the compiler, a matrix sharded
over a mesh is gathered once per matrix product (15 times in 5 steps); under
Explicit mesh axes the products do not even type-check. Here each leaf of an
update is laid out so that every device holds whole matrices of its own:

- a stack axis (layers, experts) the device count divides: each device holds
  whole matrices and orthogonalizes its own, in place;
- otherwise a matrix axis (the one the leaf is already split on, if known):
  the leaf's matrices join a "bucket", a stack of equally shaped slots dealt
  out to the devices; one all-to-all brings each owner the blocks of its
  matrices, a second takes the results back to the leaf's layout.

A matrix in a bucket is zero-padded to the bucket's shape and its blocks
stand side by side in the order of the devices: a permutation of the rows
and columns of the padded matrix. Both are exact: Newton-Schulz maps [[N, 0],
[0, 0]] to [[O, 0], [0, 0]] (the Gram matrix and its polynomials keep zero
rows and columns zero; the Frobenius norm is unchanged) and commutes with
permutations, O(P N Q) = P O(N) Q. Buckets are merged greedily while that
lowers the FLOPs of the busiest device, and padded with zero matrices to a
multiple of the device count, so that every device does the same work (SPMD).
Bytes moved per device: two all-to-alls of the packed matrices, about
2 / devices of one all-gather of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from muonjax.optim.matrix_axes import MatrixView, matrix_view
from muonjax.optim.newton_schulz import newton_schulz_flops


class Bucket(NamedTuple):
    """Equally shaped matrices orthogonalized as one stack split over devices."""

    shape: tuple[int, int]  # (m, n): every member zero-padded to it
    members: tuple[int, ...]  # indices into the list of (count, rows, cols) groups
    slots: int  # stack length: the members' matrices, padded to a multiple of devices


def _per_device_flops(shape, count, devices, ns_steps) -> int:
    return math.ceil(count / devices) * newton_schulz_flops(shape, ns_steps)


def plan_buckets(
    groups: Sequence[tuple[int, int, int]], devices: int, ns_steps: int = 5
) -> list[Bucket]:
    """Buckets for matrices given as (count, rows, cols) groups, over `devices`.

    Starts from one bucket per shape and merges, greedily, the pair whose
    merge (elementwise larger shape, counts added) most lowers the per-device
    FLOPs sum_b ceil(count_b / devices) * flops(shape_b); stops when no merge
    lowers it.
    """
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (count, rows, cols) in enumerate(groups):
        if count:
            by_shape.setdefault((rows, cols), []).append(i)
    buckets = [
        (shape, tuple(members), sum(groups[i][0] for i in members))
        for shape, members in sorted(by_shape.items())
    ]

    def cost(bucket):
        return _per_device_flops(bucket[0], bucket[2], devices, ns_steps)

    while len(buckets) > 1:
        best, best_gain = None, 0
        for i in range(len(buckets)):
            for j in range(i + 1, len(buckets)):
                (sa, ma, ca), (sb, mb, cb) = buckets[i], buckets[j]
                merged = ((max(sa[0], sb[0]), max(sa[1], sb[1])), ma + mb, ca + cb)
                gain = cost(buckets[i]) + cost(buckets[j]) - cost(merged)
                if gain > best_gain:
                    best, best_gain = (i, j, merged), gain
        if best is None:
            break
        i, j, merged = best
        buckets = [b for k, b in enumerate(buckets) if k not in (i, j)] + [merged]
    return [
        Bucket(shape, tuple(sorted(members)), -(-count // devices) * devices)
        for shape, members, count in buckets
    ]


def spread_flops(
    shapes: Sequence[Sequence[int]],
    devices: int | Mapping[str, int],
    ns_steps: int = 5,
    specs: Sequence[P | None] | None = None,
    compute_dtype: Any = "float32",
) -> int:
    """Newton-Schulz FLOPs of the busiest device when leaves of `shapes` (each
    a stack of matrices on its last two axes) are spread by
    `orthogonalize_spread` over `devices` (a count, or mesh axis sizes) from
    the layouts `specs` (None: unknown), computing in `compute_dtype`."""
    count = functools.partial(newton_schulz_flops, ns_steps=ns_steps, compute_dtype=compute_dtype)
    sizes = {"devices": devices} if isinstance(devices, int) else dict(devices)
    axes = tuple(a for a, n in sizes.items() if n > 1)
    flops, groups = 0, {}
    for shape, spec in zip(shapes, specs or [None] * len(shapes)):
        view = matrix_view(shape, None)
        split = _choose_split(shape, view, sizes, axes, spec)
        if split.in_place:
            flops += count(shape) // math.prod(sizes[a] for a in axes)
        else:
            groups.setdefault(split.free, []).append(_oriented(view, split, shape, sizes))
    for free, oriented in groups.items():
        n = math.prod(sizes[a] for a in free)
        buckets = plan_buckets(oriented, n, ns_steps)
        flops += sum((b.slots // n) * count(b.shape) for b in buckets)
    return flops


def resolve_mesh(mesh: Any | None) -> Any | None:
    """The mesh to spread over: the one set by `jax.set_mesh` (its axis types
    are the ones in force), else `mesh`; None when neither has more than one
    device."""
    context = jax.sharding.get_abstract_mesh()
    if not context.empty:
        mesh = context
    return mesh if mesh is not None and _spread_axes(mesh) else None


def _spread_axes(mesh) -> tuple[str, ...]:
    """Axes the stacks are split over: all but manual (shard_map) ones of size > 1."""
    types = getattr(mesh, "axis_types", None) or (AxisType.Auto,) * len(mesh.axis_names)
    return tuple(
        name
        for name, kind in zip(mesh.axis_names, types)
        if kind != AxisType.Manual and mesh.shape[name] > 1
    )


class _Split(NamedTuple):
    """How one leaf is spread over the devices.

    Stack axes the leaf is already split on stay so (`kept`: leaf axis ->
    mesh axes); the other spread axes (`free`) go to leaf axis `axis`, major
    to minor `names` (those it is already split on first), None if there are
    none. `in_place`: `axis` is a stack axis, so every device holds whole
    matrices; else a matrix axis (`row`: a row axis), padded to `size`, a
    multiple of the free axes' devices, and the matrices go into buckets.
    """

    kept: tuple[tuple[int, tuple[str, ...]], ...]
    free: tuple[str, ...]
    axis: int | None
    names: tuple[str, ...]
    in_place: bool
    row: bool
    size: int

    def spec(self, ndim: int) -> P:
        entries: list[Any] = [None] * ndim
        for a, names in self.kept:
            entries[a] = names
        if self.axis is not None:
            entries[self.axis] = self.names
        return P(*entries)

    def padded(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(
            self.size if a == self.axis and not self.in_place else n for a, n in enumerate(shape)
        )

    def per_group(self, shape: Sequence[int], sizes) -> tuple[int, ...]:
        """The padded leaf's shape seen by one group of devices that share
        the kept axes' coordinates."""
        shape = list(self.padded(shape))
        for a, names in self.kept:
            shape[a] //= math.prod(sizes[n] for n in names)
        return tuple(shape)


def _axis_roles(view: MatrixView) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The leaf axes forming the view's stack, rows and columns."""
    n_stack = len(view.shape) - 2
    dims = view.split_shape[n_stack:]
    n_rows = next(k for k in range(len(dims) + 1) if math.prod(dims[:k]) == view.shape[-2])
    return view.perm[:n_stack], view.perm[n_stack : n_stack + n_rows], view.perm[n_stack + n_rows :]


def _reshaped(view: MatrixView, shape: Sequence[int]) -> MatrixView:
    """`view` for a leaf of another `shape` (a block of the leaf, or padded)."""
    stack, rows, cols = _axis_roles(view)
    dims = lambda axes: tuple(shape[a] for a in axes)
    return MatrixView(
        view.perm,
        dims(stack) + (math.prod(dims(rows)), math.prod(dims(cols))),
        dims(view.perm),
    )


def _entries(spec: Any, ndim: int, axes: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Per leaf axis, the spread axes its PartitionSpec splits it over."""
    entries = list(spec or ()) + [None] * (ndim - len(spec or ()))
    names = lambda e: (e,) if isinstance(e, str) else tuple(e or ())
    return [tuple(n for n in names(e) if n in axes) for e in entries]


def _choose_split(shape, view: MatrixView, sizes, axes: tuple[str, ...], spec=None) -> _Split:
    """Where a leaf goes so that each device holds whole matrices, moving as
    little as possible from its layout `spec` (None: unknown).

    Stack axes split already stay split. The free axes go, added minor to
    any the axis is already split on (so that where the leaf is replicated,
    reaching the split is a local slice), to a stack axis that can take them
    (the one already split, else the last): the matrices are then whole where
    they lie. Else to a matrix axis (the one already split, else the longest,
    first on ties, as ZeRO-1 picks), padded to a multiple of the devices.
    """
    held = _entries(spec, len(shape), axes)
    stack, rows, cols = _axis_roles(view)
    kept = {a: held[a] for a in stack if held[a]}
    free = tuple(n for n in axes if not any(n in names for names in kept.values()))
    n_free = math.prod(sizes[n] for n in free)
    if not free:
        return _Split(tuple(kept.items()), (), None, (), True, False, 0)

    def names(a):
        own = kept.get(a) or tuple(n for n in held[a] if n in free)
        return own + tuple(n for n in free if n not in own)

    def takes_free(a):
        return shape[a] % (math.prod(sizes[n] for n in kept.get(a, ())) * n_free) == 0

    in_place = sorted((a for a in stack if takes_free(a)), key=lambda a: (not held[a], -a))
    if in_place:
        a = in_place[0]
        rest = tuple((k, v) for k, v in kept.items() if k != a)
        return _Split(rest, free, a, names(a), True, False, shape[a])
    matrix = sorted(rows + cols, key=lambda a: (not held[a], -shape[a], a))
    a = next((a for a in matrix if shape[a] % n_free == 0), matrix[0])
    size = -(-shape[a] // n_free) * n_free
    return _Split(tuple(kept.items()), free, a, names(a), False, a in rows, size)


def _oriented(view: MatrixView, split: _Split, shape, sizes) -> tuple[int, int, int]:
    """(count, unsplit side, split side) of a device group's matrices."""
    *stack, rows, cols = _reshaped(view, split.per_group(shape, sizes)).shape
    return (math.prod(stack), cols, rows) if split.row else (math.prod(stack), rows, cols)


def _spread_bucket(members, splits, views, bucket: Bucket, orthogonalize_fn, mesh, free):
    """Orthogonalizes a bucket's member leaves, each split over the `free`
    axes along one of its matrix axes: an all-to-all over them brings each
    owner its matrices' blocks, another takes the results back.

    An owner's matrix is the devices' blocks side by side as columns, each
    zero-padded to the bucket's block width: a permutation of the rows and
    columns of the (zero-padded) matrix, which Newton-Schulz commutes with
    (O(P X Q) = P O(X) Q for permutations P, Q).
    """
    devices = math.prod(mesh.shape[a] for a in free)
    m, width = bucket.shape[0], bucket.shape[1] // devices
    per_device = bucket.slots // devices

    def body(*blocks):  # this device's block of each member leaf
        parts = []
        for x, view, split in zip(blocks, views, splits):
            x = _reshaped(view, x.shape).to_matrix(x)
            x = x.reshape(-1, *x.shape[-2:])
            x = jnp.swapaxes(x, -1, -2) if split.row else x  # the split side last
            parts.append(jnp.pad(x, ((0, 0), (0, m - x.shape[1]), (0, width - x.shape[2]))))
        used = sum(x.shape[0] for x in parts)
        parts.append(jnp.zeros((bucket.slots - used, m, width), parts[0].dtype))
        send = jnp.concatenate(parts).reshape(devices, per_device, m, width)
        mine = jax.lax.all_to_all(send, free, 0, 0, tiled=True)  # [source, slot]
        mine = mine.transpose(1, 2, 0, 3).reshape(per_device, m, devices * width)
        done = orthogonalize_fn(mine).reshape(per_device, m, devices, width)
        back = jax.lax.all_to_all(done.transpose(2, 0, 1, 3), free, 0, 0, tiled=True)
        back = back.reshape(bucket.slots, m, width)
        out, start = [], 0
        for x, view, split in zip(blocks, views, splits):
            local = _reshaped(view, x.shape)
            *stack, rows, cols = local.shape
            count = math.prod(stack)
            a, b = (cols, rows) if split.row else (rows, cols)
            o = back[start : start + count, :a, :b]
            o = jnp.swapaxes(o, -1, -2) if split.row else o
            out.append(local.from_matrix(o.reshape(local.shape)))
            start += count
        return tuple(out)

    specs = tuple(sp.spec(len(v.perm)) for v, sp in zip(views, splits))
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=specs)(*members)


def orthogonalize_spread(
    leaves: Sequence[jax.Array],
    views: Sequence[MatrixView],
    orthogonalize_fn: Callable[[jax.Array], jax.Array],
    mesh: Any,
    ns_steps: int = 5,
    axes: Sequence[str] | None = None,
    specs: Sequence[P | None] | None = None,
) -> list[jax.Array]:
    """`orthogonalize_fn` of each leaf's matrices (`views`), spread over `mesh`.

    Each leaf is laid out so that every device holds whole matrices of its
    own (`_choose_split`): split along stack axes, its matrices are
    orthogonalized in place; split along a matrix axis, its matrices go into
    buckets (`plan_buckets`), each matrix sent whole to its owner by an
    all-to-all, and back.

    Args:
      leaves: the arrays, in their own layout.
      views: each leaf's `MatrixView` (its stack of matrices).
      orthogonalize_fn: orthogonalizes a (..., m, n) stack, matrix by matrix.
      mesh: a `jax.sharding.Mesh` or `AbstractMesh`; every device of `axes`
        owns about 1 / devices of the work.
      ns_steps: Newton-Schulz steps, for the cost model of `plan_buckets`.
      axes: the mesh axes to spread over; default: every non-manual axis of
        size > 1.
      specs: per leaf, the `PartitionSpec` it is laid out in, where known
        (None: unknown): what is already in place stays.

    Returns:
      The leaves' orthogonalized matrices, in the leaves' shapes.
    """
    axes = tuple(a for a in (axes or _spread_axes(mesh)) if mesh.shape[a] > 1)
    specs = specs or [None] * len(leaves)
    out: list[Any] = [None] * len(leaves)
    groups: dict[tuple[str, ...], list] = {}  # free axes -> [(leaf, padded, split, shape)]
    for i, (x, view, spec) in enumerate(zip(leaves, views, specs)):
        split = _choose_split(x.shape, view, mesh.shape, axes, spec)
        if split.in_place:
            owned = NamedSharding(mesh, split.spec(x.ndim))
            x = jax.lax.with_sharding_constraint(x, owned)
            o = view.from_matrix(orthogonalize_fn(view.to_matrix(x)))
            out[i] = jax.lax.with_sharding_constraint(o, owned)
            continue
        pad = [(0, 0)] * x.ndim
        pad[split.axis] = (0, split.size - x.shape[split.axis])
        oriented = _oriented(view, split, x.shape, mesh.shape)
        groups.setdefault(split.free, []).append((i, jnp.pad(x, pad), split, oriented))
    for free, members in groups.items():
        devices = math.prod(mesh.shape[a] for a in free)
        for bucket in plan_buckets([m[3] for m in members], devices, ns_steps):
            chosen = [members[j] for j in bucket.members]
            done = _spread_bucket(
                [m[1] for m in chosen],
                [m[2] for m in chosen],
                [views[m[0]] for m in chosen],
                bucket,
                orthogonalize_fn,
                mesh,
                free,
            )
            for (i, _, split, _), o in zip(chosen, done):
                out[i] = jax.lax.slice_in_dim(o, 0, leaves[i].shape[split.axis], axis=split.axis)
    return out


def explicit_axes(mesh) -> tuple[str, ...]:
    """The mesh's Explicit axes (their shardings are part of array types)."""
    types = getattr(mesh, "axis_types", None) or ()
    return tuple(name for name, kind in zip(mesh.axis_names, types) if kind == AxisType.Explicit)
