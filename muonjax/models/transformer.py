"""The MoE language model: embedding, a scanned stack of dense blocks, a scanned
stack of MoE blocks, final norm, untied LM head."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from muonjax.models.attention import ATTENTION, LARGE_LOGIT, attention
from muonjax.models.config import ModelConfig
from muonjax.models.layers import MLP, Linear, RMSNorm
from muonjax.models.moe import MoE, balance_router_bias
from muonjax.optim.qk_clip import QKHeads, QKHeadsFn
from muonjax.optim.recipes import _key_name

LAYERS = "layers"  # logical name of the stacking axis


class ModelAux(NamedTuple):
    """What the forward pass reports besides logits (monitoring, QK-Clip, balancing)."""

    max_logit_LH: jax.Array  # max pre-softmax attention logit (after the scale) per layer and head
    n_large_logits_LH: jax.Array  # per layer and head, how many logits exceed `large_logit`
    expert_load_ME: jax.Array  # per MoE layer, the fraction of assignments per expert
    balance_loss: jax.Array  # sum over MoE layers of the sequence-wise auxiliary loss


class Block(nnx.Module):
    """Pre-norm residual block: attention, then a dense MLP or an MoE."""

    def __init__(self, config: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
        c = config
        self.attn_norm = RMSNorm(c.d_model, eps=c.rms_norm_eps)
        self.attn = attention(c, rngs=rngs)
        self.mlp_norm = RMSNorm(c.d_model, eps=c.rms_norm_eps)
        if moe:
            self.moe = MoE(c, rngs=rngs)
        else:
            self.mlp = MLP(c.d_model, c.intermediate_size, std=c.init_std, dtype=c.dtype, rngs=rngs)

    def __call__(self, x_BLD, positions_BL, large_logit: float = LARGE_LOGIT):
        h, logit_stats = self.attn(self.attn_norm(x_BLD), positions_BL, large_logit)
        x_BLD = x_BLD + h.astype(x_BLD.dtype)
        if hasattr(self, "moe"):
            h, moe_aux = self.moe(self.mlp_norm(x_BLD))
        else:
            h, moe_aux = self.mlp(self.mlp_norm(x_BLD)), None
        return x_BLD + h.astype(x_BLD.dtype), (logit_stats, moe_aux)


def _stack(config: ModelConfig, n: int, moe: bool, rngs: nnx.Rngs):
    """n Blocks with every parameter stacked on a leading "layers" axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def create(rngs):
        return Block(config, moe=moe, rngs=rngs)

    return create(rngs) if n else None


@nnx.scan(
    in_axes=(0, nnx.Carry, None, None),
    out_axes=(nnx.Carry, 0),
    transform_metadata={nnx.PARTITION_NAME: LAYERS},
)
def _run_stack(block, x_BLD, positions_BL, large_logit):
    return block(x_BLD, positions_BL, large_logit)


@nnx.scan(
    in_axes=(0, nnx.Carry, None, None),
    out_axes=(nnx.Carry, 0),
    transform_metadata={nnx.PARTITION_NAME: LAYERS},
)
def _run_stack_remat(block, x_BLD, positions_BL, large_logit):
    # keep only each layer's input; recompute the rest in the backward pass
    return nnx.remat(lambda b, x, p, t: b(x, p, t))(block, x_BLD, positions_BL, large_logit)


class Transformer(nnx.Module):
    """tokens (B, L) int -> logits (B, L, V) float32, and ModelAux; an attention
    logit above `large_logit` counts in ModelAux.n_large_logits_LH."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = nnx.Embed(
            c.vocab_size,
            c.d_model,
            embedding_init=nnx.with_metadata(
                nnx.initializers.normal(1.0), out_sharding=("vocab", "embed"), eager_sharding=False
            ),
            rngs=rngs,
        )
        self.dense_layers = _stack(c, c.first_k_dense, False, rngs)
        self.moe_layers = _stack(c, c.n_moe_layers, True, rngs)
        self.final_norm = RMSNorm(c.d_model, eps=c.rms_norm_eps)
        self.lm_head = Linear(
            c.d_model, c.vocab_size, ("embed", "vocab"), std=c.init_std, dtype=c.dtype, rngs=rngs
        )

    def __call__(self, tokens_BL, large_logit: float = LARGE_LOGIT):
        c = self.config
        B, L = tokens_BL.shape
        positions_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
        x_BLD = self.embed(tokens_BL).astype(c.dtype)
        logit_stats, loads, balance = [], [], jnp.zeros((), jnp.float32)
        run = _run_stack_remat if c.remat else _run_stack
        if self.dense_layers is not None:
            x_BLD, (stats, _) = run(self.dense_layers, x_BLD, positions_BL, large_logit)
            logit_stats.append(stats)
        if self.moe_layers is not None:
            x_BLD, (stats, moe_aux) = run(self.moe_layers, x_BLD, positions_BL, large_logit)
            logit_stats.append(stats)
            loads.append(moe_aux.load_E)
            balance = jnp.sum(moe_aux.balance_loss)
        x_BLD = self.final_norm(x_BLD)
        logits_BLV = self.lm_head(x_BLD)
        aux = ModelAux(
            max_logit_LH=jnp.concatenate([s.max_logit for s in logit_stats]),
            n_large_logits_LH=jnp.concatenate([s.n_large for s in logit_stats]),
            expert_load_ME=jnp.concatenate(loads) if loads else jnp.zeros((0, c.n_routed_experts)),
            balance_loss=balance,
        )
        return logits_BLV.astype(jnp.float32), aux

    def balance_experts(self, expert_load_ME, rate: float = 1e-3):
        """Moves each MoE layer's router bias toward balanced load (outside the gradient)."""
        if self.moe_layers is not None:
            bias = self.moe_layers.moe.router.bias
            bias[...] = balance_router_bias(bias[...], expert_load_ME, rate)


def qk_clip_heads(config: ModelConfig) -> QKHeadsFn:
    """Where QK-Clip (`muonjax.apply_qk_clip`) rescales this model's heads, for
    the rows of ModelAux.max_logit_LH: the dense stack's layers first, then the
    MoE stack's, each stack's kernels (layers, in, heads x features)."""
    parts = ATTENTION[config.attention].qk_clip_parts(config)
    k = config.first_k_dense
    stacks = {"dense_layers": slice(0, k), "moe_layers": slice(k, config.n_layers)}

    def heads(path, leaf) -> QKHeads | None:
        del leaf
        names = [_key_name(key) for key in path]
        if names[-1] == "value":  # an nnx.Param's own pytree node
            names = names[:-1]
        if len(names) == 4 and names[0] in stacks and names[1] == "attn" and names[3] == "kernel":
            if names[2] in parts:
                return QKHeads(stacks[names[0]], *parts[names[2]])
        return None

    return heads
