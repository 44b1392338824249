"""The train state, the optimizer of a run, and the jitted train and eval steps."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import muonjax
from muonjax.models import ModelConfig, Transformer
from muonjax.train.config import TrainConfig

GROUPS = (muonjax.optim.recipes.MUON, muonjax.optim.recipes.ADAMW)


class TrainState(NamedTuple):
    """Everything a step reads and writes; checkpointed whole."""

    step: jax.Array  # () int32: batches consumed
    params: nnx.State  # the model's nnx.Param variables
    rest: nnx.State  # its other variables (router balancing biases)
    opt_state: optax.OptState
    nonfinite: jax.Array  # () int32: consecutive steps skipped for a non-finite loss/gradient
    skipped: jax.Array  # () int32: all steps skipped so far


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup to the peak, cosine decay to 10% of it at `schedule_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.schedule_steps, config.warmup_steps + 1),
        end_value=0.1 * config.learning_rate,
    )


def make_optimizer(config: TrainConfig, orthogonalize_with=None) -> optax.GradientTransformation:
    """muon: the Moonlight recipe; adamw: AdamW everywhere. Same lr and wd (paper Sec. 2.2).
    `orthogonalize_with`: where Muon orthogonalizes each matrix stack (see
    muonjax.parallel.Plan.orthogonalize)."""
    schedule = learning_rate_schedule(config)
    if config.optimizer == "muon":
        return muonjax.moonlight(
            schedule,
            weight_decay=config.weight_decay,
            orthogonalize_with=orthogonalize_with,
        )
    return optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=config.weight_decay)


def init_state(model_config: ModelConfig, tx, seed: int) -> tuple[nnx.GraphDef, TrainState]:
    model = Transformer(model_config, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    zero = jnp.zeros((), jnp.int32)
    return graphdef, TrainState(zero, params, rest, tx.init(params), zero, zero)


def abstract_state(model_config: ModelConfig, tx, seed: int) -> tuple[nnx.GraphDef, TrainState]:
    """The graph and the state's shapes and dtypes, nothing allocated."""
    out = {}

    def build():
        out["graphdef"], state = init_state(model_config, tx, seed)
        return state

    shapes = jax.eval_shape(build)
    return out["graphdef"], shapes


def _rms(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    total = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
    return jnp.sqrt(total / float(sum(x.size for x in leaves)))


def _group(tree, labels, group):
    return [x for x, label in zip(jax.tree.leaves(tree), jax.tree.leaves(labels)) if label == group]


def lm_loss(graphdef, params, rest, tokens_BL):
    """Next-token cross-entropy (mean over tokens) and the model's aux outputs."""
    model = nnx.merge(graphdef, params, rest)
    logits_BLV, aux = model(tokens_BL[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, tokens_BL[:, 1:]).mean()
    return ce, aux


def loss_and_grads(graphdef, params, rest, tokens_BL):
    """Cross-entropy, the model's aux outputs, and the gradient of
    cross-entropy + balance loss with respect to the parameters."""

    def loss_fn(variables):
        ce, aux = lm_loss(graphdef, *variables, tokens_BL)
        return ce + aux.balance_loss, (ce, aux)

    # Differentiating the non-Param variables too (their gradient is unused)
    # keeps all of the model's variables on one trace level, as nnx.scan needs.
    (_, (ce, aux)), (grads, _) = jax.value_and_grad(loss_fn, has_aux=True)((params, rest))
    return ce, aux, grads


def train_step(graphdef, tx, config: TrainConfig, state: TrainState, tokens_BL, grads_fn=None):
    """One optimizer step; a non-finite loss or gradient skips the update.

    `grads_fn(params, rest, tokens)` computes (ce, aux, grads), by default
    `loss_and_grads`; muonjax.train.program passes a data-parallel one whose
    gradients arrive reduce-scattered into the optimizer state's layout (ZeRO-1).
    """
    grads_fn = grads_fn or functools.partial(loss_and_grads, graphdef)
    ce, aux, grads = grads_fn(state.params, state.rest, tokens_BL)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    model = nnx.merge(graphdef, params, state.rest)
    model.balance_experts(aux.expert_load_ME)
    _, _, rest = nnx.split(model, nnx.Param, ...)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(ce) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        rest=keep(rest, state.rest),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    labels = muonjax.moonlight_labels(state.params)
    load = aux.expert_load_ME
    metrics = {
        "loss": ce,
        "balance_loss": aux.balance_loss,
        "grad_norm": grad_norm,
        "learning_rate": learning_rate_schedule(config)(state.step),
        "max_attention_logit": jnp.max(aux.max_logit_LH),
        # max over MoE layers of (most-loaded expert's share / the mean share)
        "expert_load_imbalance": jnp.max(load.max(-1) / load.mean(-1))
        if load.size
        else jnp.ones(()),
        "skipped_steps": new_state.skipped,
    }
    for group in GROUPS:
        metrics[f"update_rms_{group}"] = _rms(_group(updates, labels, group))
        metrics[f"weight_rms_{group}"] = _rms(_group(new_state.params, labels, group))
    return new_state, metrics


def eval_loss(graphdef, state: TrainState, tokens_BL) -> jax.Array:
    return lm_loss(graphdef, state.params, state.rest, tokens_BL)[0]


def param_groups(params: Any) -> dict[str, int]:
    """How many parameters the Moonlight recipe sends to each optimizer."""
    labels = muonjax.moonlight_labels(params)
    return {g: sum(x.size for x in _group(params, labels, g)) for g in GROUPS}
