"""The train state, the optimizer of a run, and the jitted train and eval steps."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import muonjax
from muonjax.models import ModelConfig, Transformer, qk_clip_heads
from muonjax.models.attention import LARGE_LOGIT
from muonjax.models.cross_entropy import chunked_cross_entropy
from muonjax.models.transformer import matmul_weights_in
from muonjax.train.config import TrainConfig
from muonjax.train.optimizers import applied_count, learning_rate_schedule

GROUPS = (muonjax.optim.recipes.MUON, muonjax.optim.recipes.ADAMW)


class TrainState(NamedTuple):
    """Everything a step reads and writes; checkpointed whole."""

    step: jax.Array  # () int32: batches consumed
    params: nnx.State  # the model's nnx.Param variables
    rest: nnx.State  # its other variables (router balancing biases)
    opt_state: optax.OptState
    nonfinite: (
        jax.Array
    )  # () int32: consecutive steps skipped (non-finite loss, gradient or update)
    skipped: jax.Array  # () int32: all steps skipped so far


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


def _rms_metrics(updates, params, labels, logged) -> dict:
    """Each group's update and weight RMS: two passes over every parameter for
    the metrics alone, so taken on logged steps only (`logged`, traced); NaN
    on the others, whose metrics are never written."""
    names = [(f"{kind}_rms_{g}", kind, g) for g in GROUPS for kind in ("update", "weight")]

    def measure(updates, params):
        trees = {"update": updates, "weight": params}
        return {name: _rms(_group(trees[kind], labels, g)) for name, kind, g in names}

    def skip(updates, params):
        return {name: jnp.full((), jnp.nan, jnp.float32) for name, _, _ in names}

    return jax.lax.cond(logged, measure, skip, updates, params)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _group(tree, labels, group):
    return [x for x, label in zip(jax.tree.leaves(tree), jax.tree.leaves(labels)) if label == group]


def split_targets(tokens_BL):
    """A stored batch (B, L+1) -> inputs (B, L), targets (B, L), weights (B, L) float32.

    A stored token t >= 0 is the id t; t < 0 stores the id -(t + 1) as an
    input-only token (a prompt, for supervised fine-tuning): the model sees the
    id, and it is not a loss target (weight 0). Plain text has no negative
    tokens, so every next token is a target.
    """
    ids_BL = jnp.where(tokens_BL < 0, -(tokens_BL + 1), tokens_BL)
    weights_BL = (tokens_BL[:, 1:] >= 0).astype(jnp.float32)
    return ids_BL[:, :-1], ids_BL[:, 1:], weights_BL


def count_targets(tokens_BL) -> jax.Array:
    """() float32: how many loss targets a stored batch holds (see `split_targets`)."""
    return jnp.sum(tokens_BL[:, 1:] >= 0, dtype=jnp.int32).astype(jnp.float32)


def lm_loss(graphdef, params, rest, tokens_BL, n_targets=None, large_logit=LARGE_LOGIT, stats=True):
    """Masked next-token cross-entropy, sum over targets / n_targets, and the
    model's aux outputs (attention logits above `large_logit` counted; their
    statistics only where `stats`, see Transformer).

    `n_targets` defaults to this batch's own count (the masked mean); a
    micro-batch or a device's shard passes the whole global batch's count, so
    that the parts' losses sum to the global masked mean. A batch without
    targets has loss 0, not 0/0.
    """
    inputs_BL, targets_BL, weights_BL = split_targets(tokens_BL)
    model = nnx.merge(graphdef, params, rest)
    x_BLD, aux = model.features(inputs_BL, large_logit, stats)
    dtype = model.config.dtype
    w_DV = model.lm_head.kernel[...].astype(dtype)
    # logits of (2^26 / V) tokens at a time, 256 MiB of float32, never all of them
    ce = chunked_cross_entropy(
        x_BLD.reshape(-1, x_BLD.shape[-1]).astype(dtype),
        w_DV,
        targets_BL.reshape(-1),
        weights_BL.reshape(-1),
        chunk=max(1, 2**26 // w_DV.shape[1]),
    )
    n = count_targets(tokens_BL) if n_targets is None else n_targets
    return ce / jnp.maximum(n, 1.0), aux


def loss_and_grads(
    graphdef,
    params,
    rest,
    tokens_BL,
    n_targets=None,
    balance_weight=1.0,
    large_logit=LARGE_LOGIT,
    stats=True,
):
    """Cross-entropy (see `lm_loss`), the model's aux outputs, and the gradient
    of cross-entropy + balance_weight * balance loss with respect to the parameters."""

    def loss_fn(variables):
        ce, aux = lm_loss(graphdef, *variables, tokens_BL, n_targets, large_logit, stats)
        return ce + balance_weight * aux.balance_loss, (ce, aux)

    # Differentiating the non-Param variables too (their gradient is unused)
    # keeps all of the model's variables on one trace level, as nnx.scan needs.
    (_, (ce, aux)), (grads, _) = jax.value_and_grad(loss_fn, has_aux=True)((params, rest))
    return ce, aux, grads


def micro_batches(tokens_BL, k: int):
    """(B, L+1) -> (k, B/k, L+1). Micro-batch i takes rows i, i+k, i+2k, ...:
    a shard of B/(data-parallel) contiguous rows, k dividing it, holds an equal
    part of every micro-batch, so splitting moves no rows between devices."""
    B = tokens_BL.shape[0]
    return tokens_BL.reshape(B // k, k, *tokens_BL.shape[1:]).swapaxes(0, 1)


def accumulated_grads(
    graphdef, params, rest, tokens_BL, *, k: int, n_targets, balance_weight, large_logit, stats
):
    """`loss_and_grads` summed over k micro-batches of tokens_BL in one
    `lax.scan` (peak activation memory of B/k rows), gradients summed in float32.

    Each micro-batch's loss is its targets' cross-entropy sum / `n_targets`
    plus balance_weight * its balance loss, so with n_targets the global count
    and balance_weight 1/(k * replicas) the sums are the global batch's masked
    mean and mean balance loss, and their gradients. Aux: max_logit the max,
    n_large_logits the sum, expert_load and balance_loss the mean over
    micro-batches.
    """
    # the matmul weights cast to the compute dtype once a step, not at each use in
    # each micro-batch and again in remat's recomputation (same values and gradients)
    dtype = nnx.merge(graphdef, params, rest).config.dtype
    grad_fn = functools.partial(
        loss_and_grads,
        graphdef,
        matmul_weights_in(params, dtype),
        rest,
        n_targets=n_targets,
        balance_weight=balance_weight,
        large_logit=large_logit,
        stats=stats,
    )
    as_params = lambda grads: jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)  # noqa: E731
    if k == 1:
        ce, aux, grads = grad_fn(tokens_BL)
        return ce, aux, as_params(grads)

    def body(carry, tokens):
        ce_sum, grads_sum = carry
        ce, aux, grads = grad_fn(tokens)
        grads_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grads_sum, grads)
        return (ce_sum + ce, grads_sum), aux

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (jnp.zeros((), jnp.float32), zeros)
    (ce, grads), aux_K = jax.lax.scan(body, init, micro_batches(tokens_BL, k))
    grads = as_params(grads)
    aux = type(aux_K)(
        max_logit_LH=jnp.max(aux_K.max_logit_LH, axis=0),
        n_large_logits_LH=jnp.sum(aux_K.n_large_logits_LH, axis=0),
        expert_load_ME=jnp.mean(aux_K.expert_load_ME, axis=0),
        balance_loss=jnp.mean(aux_K.balance_loss, axis=0),
    )
    return ce, aux, grads


def global_grads(graphdef, config: TrainConfig, params, rest, tokens_BL, stats=True):
    """The whole batch's masked-mean loss, aux and gradients, in config.grad_accum
    micro-batches (one device, or a mesh whose collectives XLA places)."""
    k = config.grad_accum
    n_targets = count_targets(tokens_BL)
    return accumulated_grads(
        graphdef,
        params,
        rest,
        tokens_BL,
        k=k,
        n_targets=n_targets,
        balance_weight=1.0 / k,
        large_logit=config.large_logit_threshold,
        stats=stats,
    )


def attention_logit_metrics(aux, tokens_BL) -> dict:
    """The max attention logit (overall and per layer) and the paper's large
    attention logits ratio (App. D: the fraction of a batch's logits above the
    threshold), overall and per layer, over the valid (causal) logits of the
    global batch tokens_BL (B, L+1): B x heads x L(L+1)/2 per layer."""
    B, L = tokens_BL.shape[0], tokens_BL.shape[1] - 1
    n_layers, n_heads = aux.max_logit_LH.shape
    valid = B * n_heads * L * (L + 1) / 2
    n_large_L = jnp.sum(aux.n_large_logits_LH, axis=-1)
    return {
        "max_attention_logit": jnp.max(aux.max_logit_LH),
        "max_attention_logit_per_layer": jnp.max(aux.max_logit_LH, axis=-1),
        "large_attention_logit_ratio": jnp.sum(n_large_L) / (n_layers * valid),
        "large_attention_logit_ratio_per_layer": n_large_L / valid,
    }


def train_step(graphdef, tx, config: TrainConfig, state: TrainState, tokens_BL, grads_fn=None):
    """One optimizer step; a non-finite loss, gradient or new parameter skips the update.
    With config.qk_clip the new parameters are QK-clipped by the step's max
    attention logits (`muonjax.apply_qk_clip`).

    `grads_fn(params, rest, tokens, stats)` computes (ce, aux, grads) of the
    whole batch, the attention logits' statistics only where `stats` (every
    step with QK-Clip, else the logged ones: unlogged steps' metrics, which the
    loop never writes, hold -inf and 0 for them, and NaN for the RMS ones), by
    default `global_grads` (config.grad_accum micro-batches);
    muonjax.train.program passes a data-parallel one whose gradients arrive
    reduce-scattered into the optimizer state's layout (ZeRO-1).
    """
    grads_fn = grads_fn or functools.partial(global_grads, graphdef, config)
    logged = config.due(state.step + 1, config.log_every)  # a traced bool
    # the passes that feed only metrics run on logged steps; QK-Clip needs the
    # max logits every step (a Python True: no cond)
    stats = config.qk_clip is not None or logged
    ce, aux, grads = grads_fn(state.params, state.rest, tokens_BL, stats)
    # the rate this update applies: the optimizer's count, which skipped steps do not advance
    learning_rate = learning_rate_schedule(config)(applied_count(state.opt_state))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    model = nnx.merge(graphdef, params, state.rest)
    if config.qk_clip is not None:  # QK-Clip on the new parameters, by this step's logits
        heads = qk_clip_heads(model.config)
        params = muonjax.apply_qk_clip(params, aux.max_logit_LH, config.qk_clip, heads)
    model.balance_experts(aux.expert_load_ME)
    _, _, rest = nnx.split(model, nnx.Param, ...)

    grad_norm = optax.tree.norm(grads)
    # the new parameters too: a finite gradient can still make a non-finite update
    # (an overflowing learning rate), and a checkpoint must only hold finite ones
    finite = jnp.isfinite(ce) & jnp.isfinite(grad_norm) & _all_finite(params)
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
        "learning_rate": learning_rate,
        **attention_logit_metrics(aux, tokens_BL),
        # max over MoE layers of (most-loaded expert's share / the mean share)
        "expert_load_imbalance": jnp.max(load.max(-1) / load.mean(-1))
        if load.size
        else jnp.ones(()),
        "skipped_steps": new_state.skipped,
    }
    if config.qk_clip is not None:
        clipped_LH = muonjax.qk_clip_factors(aux.max_logit_LH, config.qk_clip) < 1.0
        metrics["qk_clipped_heads"] = jnp.sum(clipped_LH, dtype=jnp.int32)
        metrics["qk_clipped_heads_per_layer"] = jnp.sum(clipped_LH, axis=-1, dtype=jnp.int32)
    metrics.update(_rms_metrics(updates, new_state.params, labels, logged))
    return new_state, metrics


def eval_loss(graphdef, state: TrainState, tokens_BL) -> jax.Array:
    """[the sum of the batch's masked cross-entropy, its count of targets] (see
    `split_targets`): batches with different counts average by their sums."""
    total = lm_loss(graphdef, state.params, state.rest, tokens_BL, 1.0, stats=False)[0]
    return jnp.stack([total, count_targets(tokens_BL)])


def param_groups(params: Any) -> dict[str, int]:
    """How many parameters the Moonlight recipe sends to each optimizer."""
    labels = muonjax.moonlight_labels(params)
    return {g: sum(x.size for x in _group(params, labels, g)) for g in GROUPS}
