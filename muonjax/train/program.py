"""A run's jitted functions on a mesh: init, train step and eval, with the
parameter, ZeRO-1 optimizer-state and batch shardings they read and write."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from muonjax.models import ModelAux, ModelConfig, abstract_model
from muonjax.models.moe import ExpertSharding, expert_sharding
from muonjax.parallel import RULES, MeshError, Plan
from muonjax.parallel.sharding import mesh_axes
from muonjax.train.config import TrainConfig
from muonjax.train.optimizers import make_optimizer
from muonjax.train.step import (
    TrainState,
    abstract_state,
    accumulated_grads,
    count_targets,
    eval_loss,
    global_grads,
    init_state,
    train_step,
)


@dataclasses.dataclass
class Program:
    mesh: jax.sharding.Mesh
    plan: Plan
    graphdef: nnx.GraphDef
    tx: Any  # the optax optimizer
    shapes: TrainState  # ShapeDtypeStructs of the state
    shardings: TrainState  # NamedShardings of the state
    init: Any  # () -> TrainState
    step: Any  # (TrainState, tokens) -> (TrainState, metrics); donates the state
    eval: Any  # (TrainState, tokens) -> loss

    @property
    def batch(self) -> jax.sharding.NamedSharding:
        return self.plan.batch

    def abstract(self) -> TrainState:
        """The state's shapes with their shardings, e.g. to restore a checkpoint into."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.shapes,
            self.shardings,
        )


BATCH_AXES = RULES["batch"]


def _grads_fn(graphdef, config: TrainConfig, plan: Plan, layout: ExpertSharding):
    """Data-parallel gradients of the global batch in the optimizer state's layout.

    Without tensor parallelism the forward and backward run per device under
    shard_map, over config.grad_accum micro-batches of the device's rows, and
    the summed gradients are reduced once per step: psum_scatter over `data`
    into their ZeRO-1 shard (psum where the state is not split over data),
    psum over `expert` for the parameters the expert axis does not split.
    Each device's loss is its targets' cross-entropy sum over the global
    target count (and its balance loss over k x replicas), so the sums are the
    global masked mean and its gradient. XLA:CPU turns the reduction it
    derives from shardings into an all-reduce plus a slice, which moves twice
    the bytes. With a tensor axis, the compiler places the collectives (the
    gradients are only constrained).
    """
    mesh = plan.mesh
    k = config.grad_accum
    whole = functools.partial(global_grads, graphdef, config)
    if mesh.size == 1:
        return None
    if mesh.shape["tensor"] > 1:

        def constrained(params, rest, tokens):
            ce, aux, grads = whole(params, rest, tokens)
            return ce, aux, jax.lax.with_sharding_constraint(grads, plan.state_like)

        return constrained

    replicas = math.prod(mesh.shape[a] for a in BATCH_AXES)
    manual = layout._replace(manual=True)
    is_spec = lambda x: isinstance(x, P)

    def reduce(grad, param_spec, state_spec):
        sharded_by = {a for entry in param_spec for a in mesh_axes(entry)}
        summed = [a for a in BATCH_AXES if a not in sharded_by and mesh.shape[a] > 1]
        if "data" in summed and plan.zero1:
            dim = next(
                (d for d, entry in enumerate(state_spec) if "data" in mesh_axes(entry)), None
            )
            if dim is not None:
                grad = jax.lax.psum_scatter(grad, "data", scatter_dimension=dim, tiled=True)
                summed.remove("data")
        if summed:
            grad = jax.lax.psum(grad, tuple(summed))
        return grad

    def local(params, rest, tokens):
        n_targets = jax.lax.psum(count_targets(tokens), BATCH_AXES)
        with expert_sharding(manual):
            ce, aux, grads = accumulated_grads(
                graphdef,
                params,
                rest,
                tokens,
                k=k,
                n_targets=n_targets,
                balance_weight=1.0 / (k * replicas),
                large_logit=config.large_logit_threshold,
            )
        aux = ModelAux(
            max_logit_LH=jax.lax.pmax(aux.max_logit_LH, BATCH_AXES),
            n_large_logits_LH=jax.lax.psum(aux.n_large_logits_LH, BATCH_AXES),
            expert_load_ME=jax.lax.psum(aux.expert_load_ME, BATCH_AXES) / replicas,
            balance_loss=jax.lax.psum(aux.balance_loss, BATCH_AXES) / replicas,
        )
        grads = jax.tree.map(reduce, grads, plan.param_specs, plan.state_specs, is_leaf=is_spec)
        return jax.lax.psum(ce, BATCH_AXES), aux, grads

    rest_specs = lambda rest: jax.tree.map(lambda _: P(), rest)

    def sharded(params, rest, tokens):
        grad_specs = plan.state_specs if plan.zero1 else plan.param_specs
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(plan.param_specs, rest_specs(rest), P(BATCH_AXES)),
            out_specs=(P(), P(), grad_specs),
            check_vma=False,
        )(params, rest, tokens)

    return sharded


def check_batch(batch_size: int, mesh: jax.sharding.Mesh, grad_accum: int = 1) -> None:
    """Each device's rows (batch / data x expert) must split into grad_accum micro-batches."""
    data_parallel = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % data_parallel:
        raise MeshError(
            f"--batch-size {batch_size} is not divisible by the data-parallel size {data_parallel} (data x expert)"
        )
    rows = batch_size // data_parallel
    if rows % grad_accum:
        raise MeshError(
            f"--batch-size {batch_size} gives {rows} rows per device over the data-parallel "
            f"size {data_parallel} (data x expert), which --grad-accum {grad_accum} does not "
            f"divide: use a multiple of {data_parallel * grad_accum}"
        )


def build(config: TrainConfig, model_config: ModelConfig, mesh: jax.sharding.Mesh) -> Program:
    check_batch(config.batch_size, mesh, config.grad_accum)
    plan = Plan(mesh, nnx.state(abstract_model(model_config), nnx.Param), zero1=config.zero1)
    # With ZeRO-1 each device owns whole matrices for Newton-Schulz; without,
    # every device holds every gradient and orthogonalizes all of it in place.
    tx = make_optimizer(config, hidden_size=model_config.d_model, mesh=mesh if plan.zero1 else None)
    graphdef, shapes = abstract_state(model_config, tx, config.seed)
    replicated = plan.replicated
    shardings = TrainState(
        step=replicated,
        params=plan.params,
        rest=Plan(mesh, shapes.rest, zero1=False).params,
        opt_state=plan.for_state(shapes.opt_state),
        nonfinite=replicated,
        skipped=replicated,
    )
    layout = ExpertSharding(mesh, batch_axes=BATCH_AXES, expert_axis="expert", tensor_axis="tensor")

    def in_layout(fn):
        @functools.wraps(fn)
        def wrapped(*args):
            with expert_sharding(layout):
                return fn(*args)

        return wrapped

    step = functools.partial(
        train_step, graphdef, tx, config, grads_fn=_grads_fn(graphdef, config, plan, layout)
    )
    return Program(
        mesh=mesh,
        plan=plan,
        graphdef=graphdef,
        tx=tx,
        shapes=shapes,
        shardings=shardings,
        init=jax.jit(lambda: init_state(model_config, tx, config.seed)[1], out_shardings=shardings),
        step=jax.jit(
            in_layout(step),
            in_shardings=(shardings, plan.batch),
            out_shardings=(shardings, None),
            donate_argnums=0,
        ),
        eval=jax.jit(
            in_layout(functools.partial(eval_loss, graphdef)), in_shardings=(shardings, plan.batch)
        ),
    )
