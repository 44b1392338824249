"""Parameter counts from shapes alone (nnx.eval_shape: nothing is allocated)."""

from __future__ import annotations

import math

import jax
from flax import nnx

from muonjax.models.config import ModelConfig
from muonjax.models.transformer import Transformer
from muonjax.optim.paths import path_names


def abstract_model(config: ModelConfig):
    """The model with ShapeDtypeStructs in place of arrays."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def param_counts(config: ModelConfig) -> dict[str, int]:
    """total / active (used per token) / embedding (token embedding + LM head)
    parameter counts, and both without the embedding."""
    state = nnx.state(abstract_model(config), nnx.Param)
    total = active = embedding = 0
    routed_fraction = config.experts_per_token / config.n_routed_experts
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        names = path_names(path)
        size = math.prod(leaf.shape)
        total += size
        if names[0] in ("embed", "lm_head"):
            embedding += size
        # only experts_per_token of the routed experts run for a given token
        active += size * routed_fraction if "experts" in names else size
    return {
        "total": total,
        "active": round(active),
        "embedding": embedding,
        "total_non_embedding": total - embedding,
        "active_non_embedding": round(active) - embedding,
    }


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Forward+backward model FLOPs per token (PaLM's convention): 6 x the
    active matmul parameters (the k routed experts, not the embedding lookup)
    plus 12 x layers x seq_len x heads x (qk + v head dims) / 2 for attention."""
    counts = param_counts(config)
    matmul_params = counts["active"] - config.vocab_size * config.d_model
    v_dim = config.v_head_dim if config.attention == "mla" else config.head_dim
    attention = 2 * seq_len * config.n_heads * (config.qk_head_dim + v_dim)
    return 3 * (2 * matmul_params + config.n_layers * attention)
