"""Logical axis names -> mesh axes, and ZeRO-1 shardings for optimizer state.

Parameters are sharded by their logical names (experts over `expert`, heads
and MLP width and vocabulary over `tensor`) and replicated over `data`.
Optimizer state is, in addition, partitioned over `data` (ZeRO-1): along a
stack axis (experts, then layers) where `data` divides it, else along the
largest matrix axis it divides. Muon's Newton-Schulz does not follow this
layout: it spreads whole matrices over every device of the mesh
(muonjax.optim.distributed), whatever the state's layout.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from muonjax.optim.zero1 import mesh_axes, zero1_sharding
from muonjax.parallel.mesh import BATCH_AXES, MeshError

# Logical name -> mesh axis (None: replicated).
RULES = {
    "batch": BATCH_AXES,
    "experts": "expert",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "embed": None,
    "kv": None,
    "q_lora": None,
    None: None,
}
STACK_AXES = ("experts", "layers")  # preferred in this order for ZeRO-1's data axis


def _size(mesh, entry) -> int:
    return math.prod(mesh.shape[a] for a in mesh_axes(entry))


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def logical_spec(mesh, logical: tuple, shape: tuple[int, ...], where: str) -> P:
    """The PartitionSpec of a parameter from its logical axis names."""
    entries = []
    for dim, (name, size) in enumerate(zip(logical, shape)):
        if name not in RULES:
            raise MeshError(f"{where}: logical axis {name!r} has no sharding rule")
        axes = tuple(a for a in mesh_axes(RULES[name]) if mesh.shape[a] > 1)
        if size % _size(mesh, axes):
            raise MeshError(
                f"mesh {_describe(mesh, axes)} does not divide dimension {dim} ({name}) of size {size} "
                f"of {where} {tuple(shape)}"
            )
        entries.append(_entry(axes))
    return P(*entries)


def zero1_spec(mesh, logical: tuple, shape: tuple[int, ...], spec: P) -> P:
    """`spec` with the data axis added by the ZeRO-1 rule (`zero1_sharding`),
    the stack axes (experts, then layers) tried first; replicated over data if
    it divides no dimension."""
    first = [d for name in STACK_AXES for d, n in enumerate(logical) if n == name]
    return zero1_sharding(NamedSharding(mesh, spec), shape, "data", first).spec


def _describe(mesh, axes) -> str:
    return ",".join(f"{a}={mesh.shape[a]}" for a in axes) or "(none)"


class Plan:
    """Shardings of a model's parameters, their ZeRO-1 state and the batch.

    `params` is the model's nnx.Param state (arrays or ShapeDtypeStructs);
    leaf paths below are those of its array leaves.
    """

    def __init__(self, mesh, params: nnx.State, zero1: bool = True):
        self.mesh = mesh
        self.zero1 = zero1 and mesh.shape["data"] > 1
        variables = jax.tree_util.tree_leaves_with_path(
            params, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
        paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(params)]
        self._param_specs, self._state_specs, self._logical = {}, {}, {}
        for path, (var_path, var) in zip(paths, variables, strict=True):
            where = jax.tree_util.keystr(var_path)
            logical = tuple(var.get_metadata().get("out_sharding") or (None,) * len(var.shape))
            spec = logical_spec(mesh, logical, var.shape, where)
            self._param_specs[path] = spec
            self._logical[path] = logical
            self._state_specs[path] = (
                zero1_spec(mesh, logical, var.shape, spec) if self.zero1 else spec
            )
        treedef = jax.tree.structure(params)
        self.param_specs = jax.tree.unflatten(treedef, list(self._param_specs.values()))
        self.state_specs = jax.tree.unflatten(treedef, list(self._state_specs.values()))
        self.params = jax.tree.unflatten(
            treedef, [self.named(s) for s in self._param_specs.values()]
        )
        self.state_like = jax.tree.unflatten(
            treedef, [self.named(s) for s in self._state_specs.values()]
        )
        self._lengths = sorted({len(p) for p in paths}, reverse=True)

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def batch(self) -> NamedSharding:
        return self.named(P(BATCH_AXES))

    @property
    def newton_schulz_mesh(self) -> jax.sharding.Mesh | None:
        """The mesh Muon spreads Newton-Schulz over (Distributed Muon): with
        ZeRO-1 each device owns whole matrices of its own; without, every
        device holds every gradient and orthogonalizes all of it in place (None)."""
        return self.mesh if self.zero1 else None

    @property
    def replicated(self) -> NamedSharding:
        return self.named(P())

    def _entry(self, path, shape):
        """(logical names, param spec, ZeRO-1 spec) of the parameter whose path
        ends `path` and which has `shape`; None if there is none."""
        for n in self._lengths:
            key = tuple(path[-n:])
            if len(path) >= n and key in self._state_specs:
                spec = self._state_specs[key]
                if not _fits(self.mesh, spec, shape):
                    return None
                return self._logical[key], self._param_specs[key], spec
        return None

    def state_spec(self, path, leaf) -> P | None:
        """The ZeRO-1 spec of an optimizer-state leaf (or of a gradient in that
        layout) whose path ends with a parameter's path; None if none does."""
        entry = self._entry(path, leaf.shape)
        return None if entry is None else entry[2]

    def for_state(self, state_shapes: Any) -> Any:
        """Shardings for an optimizer state: a leaf whose path ends with a
        parameter's path is sharded like that parameter's ZeRO-1 state;
        anything else (step counts) is replicated."""

        def pick(path, leaf):
            spec = self.state_spec(path, leaf)
            return self.replicated if spec is None else self.named(spec)

        return jax.tree_util.tree_map_with_path(pick, state_shapes)


def _fits(mesh, spec: P, shape) -> bool:
    entries = list(spec) + [None] * (len(shape) - len(spec))
    return len(entries) == len(shape) and all(
        shape[d] % _size(mesh, entries[d]) == 0 for d in range(len(shape))
    )
