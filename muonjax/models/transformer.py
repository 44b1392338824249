"""The MoE language model: embedding, a scanned stack of dense blocks, a scanned
stack of MoE blocks, final norm, untied LM head."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from muonjax.models.attention import ATTENTION, LARGE_LOGIT, Attend, attention
from muonjax.models.config import ModelConfig
from muonjax.models.layers import MLP, Linear, RMSNorm
from muonjax.models.moe import ExpertDispatch, MoE, RoutedExperts, balance_router_bias
from muonjax.optim.paths import path_names
from muonjax.optim.qk_clip import QKHeads, QKHeadsFn

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

    def __call__(self, x_BLD, positions_BL, large_logit: float = LARGE_LOGIT, stats=True):
        h, logit_stats = self.attn(self.attn_norm(x_BLD), positions_BL, large_logit, stats)
        x_BLD = x_BLD + h.astype(x_BLD.dtype)
        h, moe_aux = self._feed_forward(x_BLD)
        return x_BLD + h.astype(x_BLD.dtype), (logit_stats, moe_aux)

    def decode(self, x_BCD, cache, positions_BC, slot, mask_BCS):
        """The block on C new tokens against its attention cache (see Transformer.decode)."""
        h, cache = self.attn.decode(self.attn_norm(x_BCD), cache, positions_BC, slot, mask_BCS)
        x_BCD = x_BCD + h.astype(x_BCD.dtype)
        h, _ = self._feed_forward(x_BCD)
        return x_BCD + h.astype(x_BCD.dtype), cache

    def _feed_forward(self, x_BLD):
        if hasattr(self, "moe"):
            return self.moe(self.mlp_norm(x_BLD))
        return self.mlp(self.mlp_norm(x_BLD)), None


def _stack(config: ModelConfig, n: int, moe: bool, rngs: nnx.Rngs):
    """n Blocks with every parameter stacked on a leading "layers" axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def create(rngs):
        return Block(config, moe=moe, rngs=rngs)

    return create(rngs) if n else None


@nnx.scan(
    in_axes=(0, nnx.Carry, None, None, None),
    out_axes=(nnx.Carry, 0),
    transform_metadata={nnx.PARTITION_NAME: LAYERS},
)
def _run_stack(block, x_BLD, positions_BL, large_logit, stats):
    return block(x_BLD, positions_BL, large_logit, stats)


def save_matmuls(prim, *args, **params) -> bool:
    """The "dots" remat policy: keep every matmul's output, batched ones included
    (attention's per-head einsums, the MoE's expert matmuls), and recompute the
    elementwise work between them. jax.checkpoint_policies.checkpoint_dots keeps
    every dot_general (dots_with_no_batch_dims_saveable would drop attention's and
    the tiled experts'); lax.ragged_dot (the MoE on GPU/TPU) is a primitive of its
    own, which neither keeps, so it is added here."""
    return (
        jax.checkpoint_policies.checkpoint_dots(prim, *args, **params)
        or prim.name == "ragged_dot_general"
    )


def _remat_stack(policy):
    """_run_stack with each layer under nnx.remat(policy): policy None keeps only
    each layer's input and recomputes the rest in the backward pass."""

    @nnx.scan(
        in_axes=(0, nnx.Carry, None, None, None),
        out_axes=(nnx.Carry, 0),
        transform_metadata={nnx.PARTITION_NAME: LAYERS},
    )
    def run(block, x_BLD, positions_BL, large_logit, stats):
        layer = nnx.remat(lambda b, x, p, t, s: b(x, p, t, s), policy=policy)
        return layer(block, x_BLD, positions_BL, large_logit, stats)

    return run


# ModelConfig.remat -> how a stack of layers runs
_RUN_STACK = {"none": _run_stack, "dots": _remat_stack(save_matmuls), "full": _remat_stack(None)}


@nnx.scan(
    in_axes=(0, nnx.Carry, 0, None, None, None),
    out_axes=(nnx.Carry, 0),
    transform_metadata={nnx.PARTITION_NAME: LAYERS},
)
def _decode_stack(block, x_BCD, cache, positions_BC, slot, mask_BCS):
    return block.decode(x_BCD, cache, positions_BC, slot, mask_BCS)


class KVCache(NamedTuple):
    """The attention caches of a batch for generation, layers stacked as the
    parameters are. Rows are left-padded: row b's tokens fill slots
    [start_B[b], length), at positions slot - start_B[b]; slots before
    start_B[b] are padding, never attended to."""

    dense: Any  # MLACache / MHACache, each field (first_k_dense, B, S, ...); None if none
    moe: Any  # the same for the MoE stack, (n_moe_layers, B, S, ...); None if none
    start_B: jax.Array  # (B,) int32: the slot of each row's first real token
    length: jax.Array  # () int32: slots written so far, the same for every row

    @property
    def max_len(self) -> int:
        """S, the slots there are."""
        return jax.tree.leaves((self.dense, self.moe))[0].shape[2]


def init_cache(config: ModelConfig, batch: int, max_len: int, start_B=None) -> KVCache:
    """An empty cache of `max_len` slots per row; start_B (default 0) is each
    row's left padding, for prompts of different lengths."""
    empty = ATTENTION[config.attention].empty_cache
    stack = lambda n: empty(config, (n, batch, max_len)) if n else None
    if start_B is None:
        start_B = jnp.zeros((batch,), jnp.int32)
    return KVCache(
        stack(config.first_k_dense),
        stack(config.n_moe_layers),
        jnp.asarray(start_B, jnp.int32),
        jnp.zeros((), jnp.int32),
    )


class Transformer(nnx.Module):
    """tokens (B, L) int -> logits (B, L, V) float32, and ModelAux; an attention
    logit above `large_logit` counts in ModelAux.n_large_logits_LH. The attention
    logits' statistics cost a pass of their own: `stats` False (or a traced bool,
    false at run time) skips it and leaves -inf maxima and zero counts."""

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

    def __call__(self, tokens_BL, large_logit: float = LARGE_LOGIT, stats=True):
        x_BLD, aux = self.features(tokens_BL, large_logit, stats)
        return self.lm_head(x_BLD).astype(jnp.float32), aux

    def features(self, tokens_BL, large_logit: float = LARGE_LOGIT, stats=True):
        """What the LM head reads: the final norm's output (B, L, D), and ModelAux."""
        c = self.config
        B, L = tokens_BL.shape
        positions_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
        x_BLD = self.embed(tokens_BL).astype(c.dtype)
        logit_stats, loads, balance = [], [], jnp.zeros((), jnp.float32)
        run = _RUN_STACK[c.remat]
        args = (positions_BL, large_logit, stats)
        if self.dense_layers is not None:
            x_BLD, (layer_stats, _) = run(self.dense_layers, x_BLD, *args)
            logit_stats.append(layer_stats)
        if self.moe_layers is not None:
            x_BLD, (layer_stats, moe_aux) = run(self.moe_layers, x_BLD, *args)
            logit_stats.append(layer_stats)
            loads.append(moe_aux.load_E)
            balance = jnp.sum(moe_aux.balance_loss)
        aux = ModelAux(
            max_logit_LH=jnp.concatenate([s.max_logit for s in logit_stats]),
            n_large_logits_LH=jnp.concatenate([s.n_large for s in logit_stats]),
            expert_load_ME=jnp.concatenate(loads) if loads else jnp.zeros((0, c.n_routed_experts)),
            balance_loss=balance,
        )
        return self.final_norm(x_BLD), aux

    def decode(self, tokens_BC, cache: KVCache):
        """C new tokens per row (the prompts at prefill, then one) -> their logits
        (B, C, V) float32, the cache with them written at slots [length, length + C).

        A query at slot t sees slots start_B[b] <= s <= t: its own row's real
        tokens, causally, as if the row's prompt ran alone. The cache must have
        room: length + C <= max_len.
        """
        c = self.config
        slots_C = cache.length + jnp.arange(tokens_BC.shape[1], dtype=jnp.int32)
        positions_BC = slots_C - cache.start_B[:, None]
        slots_S = jnp.arange(cache.max_len, dtype=jnp.int32)
        mask_BCS = (slots_S <= slots_C[:, None]) & (slots_S >= cache.start_B[:, None, None])
        x_BCD = self.embed(tokens_BC).astype(c.dtype)
        dense, moe = cache.dense, cache.moe
        args = (positions_BC, cache.length, mask_BCS)
        if self.dense_layers is not None:
            x_BCD, dense = _decode_stack(self.dense_layers, x_BCD, dense, *args)
        if self.moe_layers is not None:
            x_BCD, moe = _decode_stack(self.moe_layers, x_BCD, moe, *args)
        logits_BCV = self.lm_head(self.final_norm(x_BCD)).astype(jnp.float32)
        length = cache.length + tokens_BC.shape[1]
        return logits_BCV, cache._replace(dense=dense, moe=moe, length=length)

    def balance_experts(self, expert_load_ME, rate: float = 1e-3):
        """Moves each MoE layer's router bias toward balanced load (outside the gradient)."""
        if self.moe_layers is not None:
            bias = self.moe_layers.moe.router.bias
            bias[...] = balance_router_bias(bias[...], expert_load_ME, rate)


def matmul_weights_in(params, dtype: str):
    """`params` with the weights every use casts to the compute dtype (Linear
    kernels, the routed experts) cast to `dtype` once: the same values at each
    use, and, as a cast's cotangent is the cotangent cast back, the same
    gradients. The router's kernel (float32 scores), norms and the embedding
    (looked up, then cast) stay as they are."""

    def cast(path, leaf):
        names = path_names(path)
        weight = (names[-1] == "kernel" and names[-2] != "router") or names[-2] == "experts"
        return leaf.astype(dtype) if weight else leaf

    return jax.tree_util.tree_map_with_path(cast, params)


def qk_clip_heads(config: ModelConfig) -> QKHeadsFn:
    """Where QK-Clip (`muonjax.apply_qk_clip`) rescales this model's heads, for
    the rows of ModelAux.max_logit_LH: the dense stack's layers first, then the
    MoE stack's, each stack's kernels (layers, in, heads x features)."""
    parts = ATTENTION[config.attention].qk_clip_parts(config)
    k = config.first_k_dense
    stacks = {"dense_layers": slice(0, k), "moe_layers": slice(k, config.n_layers)}

    def heads(path, leaf) -> QKHeads | None:
        del leaf
        names = path_names(path)
        if len(names) == 4 and names[0] in stacks and names[1] == "attn" and names[3] == "kernel":
            if names[2] in parts:
                return QKHeads(stacks[names[0]], *parts[names[2]])
        return None

    return heads


def with_kernels(
    graphdef: nnx.GraphDef, state, *, experts: ExpertDispatch, attend: Attend
) -> nnx.GraphDef:
    """`graphdef` with every RoutedExperts computed by `experts` and every
    attention module's causal attention by `attend` (both hashable: the graph
    is static); `state`: a tuple of the model's variable states (arrays or
    ShapeDtypeStructs), e.g. (params, rest) as nnx.split gives them."""
    model = nnx.merge(graphdef, *state)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, RoutedExperts):
            node.dispatch = experts
        elif isinstance(node, tuple(ATTENTION.values())):
            node.attend = attend
    return nnx.graphdef(model)
