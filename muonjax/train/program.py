"""A run's jitted functions on a mesh: init, train step and eval, with the
parameter, ZeRO-1 optimizer-state and batch shardings they read and write."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from flax import nnx

from muonjax.models import ModelConfig, abstract_model
from muonjax.models.transformer import with_kernels
from muonjax.parallel import Plan
from muonjax.parallel.attention import ShardedAttention
from muonjax.parallel.experts import ShardedExperts
from muonjax.parallel.gradients import data_parallel_grads
from muonjax.train.config import TrainConfig
from muonjax.train.optimizers import make_optimizer, ns_dtype
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
    eval: Any  # (TrainState, tokens) -> [sum of the loss over targets, count of targets]

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


def _device_grads(graphdef, config: TrainConfig):
    """The loss and gradients of one device's rows (see
    muonjax.parallel.gradients.DeviceGradsFn), in config.grad_accum micro-batches."""
    k = config.grad_accum

    def grads(params, rest, tokens, n_targets, replicas, stats):
        return accumulated_grads(
            graphdef,
            params,
            rest,
            tokens,
            k=k,
            n_targets=n_targets,
            balance_weight=1.0 / (k * replicas),
            large_logit=config.large_logit_threshold,
            stats=stats,
        )

    return grads


def _state_shardings(plan: Plan, shapes: TrainState) -> TrainState:
    """Parameters by their logical axes, the optimizer state ZeRO-1, the rest replicated."""
    replicated = plan.replicated
    return TrainState(
        step=replicated,
        params=plan.params,
        rest=Plan(plan.mesh, shapes.rest, zero1=False).params,
        opt_state=plan.for_state(shapes.opt_state),
        nonfinite=replicated,
        skipped=replicated,
    )


def build(config: TrainConfig, model_config: ModelConfig, mesh: jax.sharding.Mesh) -> Program:
    """The run's program on `mesh`, one already checked against the batch
    (muonjax.parallel.run_mesh). The model's experts and attention and the
    step's gradient reduction are the sharded ones of muonjax.parallel.
    Kernels and the Newton-Schulz dtype left "auto" are chosen for the mesh's
    devices (a TPU slice's when compiling for one from a CPU host)."""
    device = mesh.devices.flat[0]
    model_config = model_config.kernels_for(device)
    config = config.replace(ns_dtype=ns_dtype(config, device.platform))
    plan = Plan(mesh, nnx.state(abstract_model(model_config), nnx.Param), zero1=config.zero1)
    tx = make_optimizer(config, hidden_size=model_config.d_model, mesh=plan.newton_schulz_mesh)
    graphdef, shapes = abstract_state(model_config, tx, config.seed)
    experts, attention = ShardedExperts(mesh), ShardedAttention(mesh)
    variables = (shapes.params, shapes.rest)
    model = with_kernels(graphdef, variables, experts=experts, attend=attention)
    device_model = with_kernels(
        graphdef, variables, experts=experts.per_device(), attend=attention.per_device()
    )
    grads_fn = data_parallel_grads(
        plan,
        whole=functools.partial(global_grads, model, config),
        per_device=_device_grads(device_model, config),
        count_targets=count_targets,
    )
    shardings = _state_shardings(plan, shapes)
    step = functools.partial(train_step, model, tx, config, grads_fn=grads_fn)
    return Program(
        mesh=mesh,
        plan=plan,
        graphdef=model,
        tx=tx,
        shapes=shapes,
        shardings=shardings,
        init=jax.jit(lambda: init_state(model_config, tx, config.seed)[1], out_shardings=shardings),
        step=jax.jit(
            step,
            in_shardings=(shardings, plan.batch),
            out_shardings=(shardings, None),
            donate_argnums=0,
        ),
        eval=jax.jit(functools.partial(eval_loss, model), in_shardings=(shardings, plan.batch)),
    )
