"""ZeRO-1 for any model: optimizer state split over a data-parallel mesh axis.

Parameters stay as the user shards them (replicated over the data axis);
every optimizer-state leaf shaped like a parameter (Muon's momentum, AdamW's
moments) is in addition split over `axis`, so each data-parallel device
holds 1 / size of it. Under `jax.jit` with these shardings XLA reduce-scatters
the gradients into the state's layout and gathers the updated parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def mesh_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def zero1_sharding(
    sharding: NamedSharding, shape: tuple[int, ...], axis: str, first: Sequence[int] = ()
) -> NamedSharding:
    """`sharding` of an array of `shape`, further split over the mesh axis `axis`.

    The axis goes to the first dimension it divides (with the dimension's
    existing split) in this order: the dimensions `first`, in their order,
    then leading (stack) dimensions from the last, then the matrix dimensions,
    longest first. Whole matrices per device where a stack allows it are what
    Distributed Muon orthogonalizes in place. Unchanged if `axis` is already
    used or divides no dimension.

    Args:
      sharding: the parameter's `NamedSharding`.
      shape: the parameter's shape.
      axis: the name of the data-parallel mesh axis.
      first: dimensions to try before the others, e.g. a model's named stack
        axes (muonjax.parallel.Plan passes its experts and layers axes).

    Returns:
      The state leaf's `NamedSharding`.
    """
    mesh = sharding.mesh
    if axis not in mesh.axis_names:
        raise ValueError(f"Mesh axis {axis!r} is not one of the mesh's axes {mesh.axis_names}.")
    entries = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    if mesh.shape[axis] == 1 or any(axis in mesh_axes(e) for e in entries):
        return sharding
    for d in _dims_in_order(shape, first):
        split = math.prod(mesh.shape[a] for a in mesh_axes(entries[d])) * mesh.shape[axis]
        if shape[d] % split == 0:
            names = mesh_axes(entries[d]) + (axis,)
            entries[d] = names[0] if len(names) == 1 else names
            return NamedSharding(mesh, P(*entries))
    return sharding


def _dims_in_order(shape: tuple[int, ...], first: Sequence[int]) -> list[int]:
    """`first`, then the stack dimensions from the last, then the matrix
    dimensions longest first: the order ZeRO-1 tries the dimensions in."""
    stack = list(reversed(range(len(shape) - 2)))
    matrix = sorted(range(max(len(shape) - 2, 0), len(shape)), key=lambda d: -shape[d])
    return list(first) + [d for d in stack + matrix if d not in first]


def zero1_state_shardings(
    tx: optax.GradientTransformation, params: Any, param_shardings: Any, axis: str
) -> Any:
    """Shardings for `tx.init(params)`: ZeRO-1 over the mesh axis `axis`.

    Each state leaf shaped like a parameter (found with
    `optax.tree_map_params`) gets `zero1_sharding` of that parameter's
    sharding; every other leaf (step counts, injected hyperparameters) is
    replicated.

    Args:
      tx: the optimizer, e.g. `muonjax.moonlight(...)`.
      params: the parameters, or their `jax.ShapeDtypeStruct`s.
      param_shardings: a tree like `params` of `NamedSharding`s (one mesh).
      axis: the name of the data-parallel mesh axis.

    Returns:
      A tree like `tx.init(params)` of `NamedSharding`s, for e.g.
      `jax.jit(tx.init, out_shardings=...)` and the train step's shardings.

    Example:
      state_sh = muonjax.zero1_state_shardings(tx, params, param_sh, "data")
      opt_state = jax.jit(tx.init, out_shardings=state_sh)(params)
    """
    shapes = jax.eval_shape(tx.init, params)
    state = jax.tree.map(
        lambda s, p: zero1_sharding(s, tuple(p.shape), axis), param_shardings, params
    )
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    masked = lambda x: isinstance(x, optax.MaskedNode)
    return optax.tree_map_params(
        tx,
        lambda leaf, sharding: leaf if masked(leaf) else sharding,
        shapes,
        state,
        transform_non_params=lambda _: NamedSharding(mesh, P()),
        is_leaf=masked,
    )
