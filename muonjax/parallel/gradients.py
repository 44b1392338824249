"""Data-parallel gradients of a global batch, reduced into the optimizer
state's layout (ZeRO-1). The train step takes the function built here as its
gradient function; the loss itself is handed in by the trainer."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from muonjax.models import ModelAux
from muonjax.optim.zero1 import mesh_axes
from muonjax.parallel.mesh import BATCH_AXES
from muonjax.parallel.sharding import Plan

# (params, rest, tokens, stats) -> (cross-entropy, ModelAux, gradients) of the whole
# batch; the attention logits' statistics in ModelAux only where `stats` (a bool,
# traced or not: see muonjax.models.Transformer)
GradsFn = Callable[[Any, Any, jax.Array, Any], tuple[jax.Array, ModelAux, Any]]
# (params, rest, tokens, n_targets, replicas, stats) -> the same for one device's rows:
# cross-entropy summed over its targets / n_targets (the global count), balance
# loss weighted 1 / (micro-batches x replicas), so that the devices' sums are
# the global batch's masked mean, mean balance loss, and their gradients
DeviceGradsFn = Callable[
    [Any, Any, jax.Array, jax.Array, int, Any], tuple[jax.Array, ModelAux, Any]
]


def data_parallel_grads(
    plan: Plan,
    whole: GradsFn,
    per_device: DeviceGradsFn,
    count_targets: Callable[[jax.Array], jax.Array],
) -> GradsFn | None:
    """Data-parallel gradients of the global batch in the optimizer state's
    layout; None on one device (the step's own whole-batch gradients do).

    Without tensor parallelism `per_device` runs on each device's rows inside
    a shard_map over every mesh axis (so its model's experts must run their
    body only: `ShardedExperts.per_device`), with `n_targets` the
    `count_targets` of the global batch, and the summed gradients are reduced
    once per step: psum_scatter over `data` into their ZeRO-1 shard (psum where
    the state is not split over data), psum over `expert` for the parameters
    the expert axis does not split. XLA:CPU turns the reduction it derives
    from shardings into an all-reduce plus a slice, which moves twice the
    bytes. With a tensor axis, `whole` runs on the global batch and the
    compiler places the collectives (the gradients are only constrained).
    """
    mesh = plan.mesh
    if mesh.size == 1:
        return None
    if mesh.shape["tensor"] > 1:
        return _constrained(plan, whole)
    return _shard_mapped(plan, _device_step(plan, per_device, count_targets))


def _constrained(plan: Plan, whole: GradsFn) -> GradsFn:
    """`whole`, its gradients constrained to the optimizer state's layout."""

    def constrained(params, rest, tokens, stats):
        ce, aux, grads = whole(params, rest, tokens, stats)
        return ce, aux, jax.lax.with_sharding_constraint(grads, plan.state_like)

    return constrained


def _device_step(plan: Plan, per_device: DeviceGradsFn, count_targets) -> GradsFn:
    """One device's part of the step: its rows' loss and gradients, reduced
    over the data-parallel devices."""
    replicas = math.prod(plan.mesh.shape[a] for a in BATCH_AXES)

    def local(params, rest, tokens, stats):
        n_targets = jax.lax.psum(count_targets(tokens), BATCH_AXES)
        ce, aux, grads = per_device(params, rest, tokens, n_targets, replicas, stats)
        aux = _reduce_aux(aux, replicas)
        grads = jax.tree.map(
            functools.partial(_reduce_grad, plan),
            grads,
            plan.param_specs,
            plan.state_specs,
            is_leaf=lambda x: isinstance(x, P),
        )
        return jax.lax.psum(ce, BATCH_AXES), aux, grads

    return local


def _reduce_aux(aux: ModelAux, replicas: int) -> ModelAux:
    """The devices' aux outputs joined: max of the max logits, sums of counts,
    means of loads and balance losses."""
    return ModelAux(
        max_logit_LH=jax.lax.pmax(aux.max_logit_LH, BATCH_AXES),
        n_large_logits_LH=jax.lax.psum(aux.n_large_logits_LH, BATCH_AXES),
        expert_load_ME=jax.lax.psum(aux.expert_load_ME, BATCH_AXES) / replicas,
        balance_loss=jax.lax.psum(aux.balance_loss, BATCH_AXES) / replicas,
    )


def _reduce_grad(plan: Plan, grad, param_spec: P, state_spec: P):
    """One device's gradient summed over the data-parallel axes its parameter
    is not split over: reduce-scattered into its ZeRO-1 shard over `data`."""
    mesh = plan.mesh
    sharded_by = {a for entry in param_spec for a in mesh_axes(entry)}
    summed = [a for a in BATCH_AXES if a not in sharded_by and mesh.shape[a] > 1]
    if "data" in summed and plan.zero1:
        dim = next((d for d, entry in enumerate(state_spec) if "data" in mesh_axes(entry)), None)
        if dim is not None:
            grad = jax.lax.psum_scatter(grad, "data", scatter_dimension=dim, tiled=True)
            summed.remove("data")
    if summed:
        grad = jax.lax.psum(grad, tuple(summed))
    return grad


def _shard_mapped(plan: Plan, local: GradsFn) -> GradsFn:
    """`local` on every device's rows, its gradients out in the state's layout."""

    def sharded(params, rest, tokens, stats):
        grad_specs = plan.state_specs if plan.zero1 else plan.param_specs
        rest_specs = jax.tree.map(lambda _: P(), rest)
        if isinstance(stats, bool):  # static: the statistics pass is in or out of the program
            device_fn, args, stats_spec = functools.partial(local, stats=stats), (), ()
        else:
            device_fn, args, stats_spec = local, (stats,), (P(),)
        return jax.shard_map(
            device_fn,
            mesh=plan.mesh,
            in_specs=(plan.param_specs, rest_specs, P(BATCH_AXES), *stats_spec),
            out_specs=(P(), P(), grad_specs),
            check_vma=False,
        )(params, rest, tokens, *args)

    return sharded
