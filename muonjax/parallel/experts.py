"""Expert parallelism: the MoE layers' routed experts split over a mesh.

`ShardedExperts` is an expert dispatch (see muonjax.models.moe.RoutedExperts)
that the program hands to the model with `with_kernels`: tokens are
split over the batch axes, experts over the expert axis and their hidden
width over the tensor axis.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from muonjax.models.dispatch import routed_experts
from muonjax.parallel.mesh import BATCH_AXES


@dataclasses.dataclass(frozen=True)
class ShardedExperts:
    """Each device routes its own tokens through its own experts: it gathers
    the tokens of its expert-axis peers, runs those routed to its own E/e
    experts (the others' ids are masked out), and a reduce-scatter returns
    every token's sum to its owner. The experts' hidden width may be split
    over the tensor axis (a psum joins it).

    Frozen and hashable: the model keeps it in its graph, which must be static.
    """

    mesh: jax.sharding.Mesh
    batch_axes: tuple[str, ...] = BATCH_AXES  # the token axis is split over these
    expert_axis: str = "expert"  # experts are split over this one (also one of batch_axes)
    tensor_axis: str = "tensor"  # the experts' hidden width is split over this one
    manual: bool = False  # called inside a shard_map over every mesh axis: run the body only

    def per_device(self) -> ShardedExperts:
        """The same dispatch for a model that runs inside a shard_map over every
        mesh axis (the gradient reduction's): each device's body, no shard_map."""
        return dataclasses.replace(self, manual=True)

    @property
    def _tensor(self) -> str | None:
        return self.tensor_axis if self.mesh.shape[self.tensor_axis] > 1 else None

    def __call__(self, x_TD, experts_TK, weights_TK, gate, up, down, *, method):
        local = lambda *args: self._device_experts(*args, method=method)
        if self.manual:
            return local(x_TD, experts_TK, weights_TK, gate, up, down)
        tokens = P(self.batch_axes)
        experts = P(self.expert_axis, None, self._tensor)
        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(
                tokens,
                tokens,
                tokens,
                experts,
                experts,
                P(self.expert_axis, self._tensor, None),
            ),
            out_specs=tokens,
            check_vma=False,  # the dispatch loop's zero-initialized carries are per-device
        )(x_TD, experts_TK, weights_TK, gate, up, down)

    def _device_experts(self, x, ids, w, g, u, d, *, method):
        """One device's part: its tokens' peers gathered, its experts run, the sums scattered back."""
        e_axis = self.expert_axis
        n_shards = self.mesh.shape[e_axis]
        if n_shards > 1:
            x, ids, w = (jax.lax.all_gather(a, e_axis, axis=0, tiled=True) for a in (x, ids, w))
            local_experts = g.shape[0]
            ids = ids - jax.lax.axis_index(e_axis) * local_experts
            ours = (ids >= 0) & (ids < local_experts)
            ids, w = jnp.where(ours, ids, local_experts), jnp.where(ours, w, 0)
        y = routed_experts(x, ids, w, g, u, d, method=method)
        if self._tensor is not None:
            y = jax.lax.psum(y, self._tensor)
        if n_shards > 1:
            y = jax.lax.psum_scatter(y, e_axis, scatter_dimension=0, tiled=True)
        return y
