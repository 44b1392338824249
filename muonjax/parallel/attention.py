"""Attention on a mesh: the attention modules' causal attention (see
muonjax.models.attention.Attend) that the program hands to the model with
`muonjax.models.transformer.with_kernels`.

Mosaic kernels (splash attention) cannot be partitioned by the compiler: on a
mesh they run inside a shard_map, rows split over the batch axes and heads
over the tensor axis. XLA's and cuDNN's kernels are left to the compiler.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.sharding import PartitionSpec as P

from muonjax.models.attention import causal_attention
from muonjax.parallel.mesh import BATCH_AXES

MANUAL_KERNELS = ("splash",)  # kernels that must run per device, in a shard_map


@dataclasses.dataclass(frozen=True)
class ShardedAttention:
    """`causal_attention` with each device attending its own rows and heads:
    heads are split over the tensor axis where it divides them, else every
    tensor-axis peer computes them all.

    Frozen and hashable: the model keeps it in its graph, which must be static.
    """

    mesh: jax.sharding.Mesh
    batch_axes: tuple[str, ...] = BATCH_AXES  # the batch is split over these
    head_axis: str = "tensor"  # heads are split over this one
    manual: bool = False  # called inside a shard_map over every mesh axis: run the body only

    def per_device(self) -> ShardedAttention:
        """The same attention for a model that runs inside a shard_map over every
        mesh axis (the gradient reduction's): each device's body, no shard_map."""
        return dataclasses.replace(self, manual=True)

    def __call__(self, q_BLHK, k_BLHK, v_BLHV, scale: float, kernel: str):
        local = functools.partial(causal_attention, scale=scale, kernel=kernel)
        if self.manual or kernel not in MANUAL_KERNELS:
            return local(q_BLHK, k_BLHK, v_BLHV)
        spec = P(self.batch_axes, None, self._heads(q_BLHK.shape[2]), None)
        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(spec,) * 3,
            out_specs=spec,
            check_vma=False,  # splash's pallas_call declares no varying axes for its outputs
        )(q_BLHK, k_BLHK, v_BLHV)

    def _heads(self, n_heads: int) -> str | None:
        """The axis the heads are split over: None where it has one device or
        does not divide them (splash needs whole heads)."""
        size = self.mesh.shape[self.head_axis]
        return self.head_axis if size > 1 and n_heads % size == 0 else None
