"""Flax NNX Mixture-of-Experts language models of the Moonlight / DeepSeek-V3 family."""

from muonjax.models.config import PRESETS, ModelConfig, preset
from muonjax.models.counts import abstract_model, flops_per_token, param_counts
from muonjax.models.moe import RouterBias, balance_router_bias
from muonjax.models.transformer import ModelAux, Transformer

__all__ = [
    "PRESETS",
    "ModelAux",
    "ModelConfig",
    "RouterBias",
    "Transformer",
    "abstract_model",
    "balance_router_bias",
    "flops_per_token",
    "param_counts",
    "preset",
]
