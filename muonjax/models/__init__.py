"""Flax NNX Mixture-of-Experts language models of the Moonlight / DeepSeek-V3 family."""

from muonjax.models.config import PRESETS, ModelConfig, preset
from muonjax.models.counts import abstract_model, flops_per_token, param_counts
from muonjax.models.generate import generate
from muonjax.models.hf import CheckpointError, from_hf, hf_config, to_hf
from muonjax.models.moe import RouterBias, balance_router_bias
from muonjax.models.spectra import FIGURE4_GROUPS, svd_entropies, svd_entropy, svd_entropy_by_group
from muonjax.models.transformer import ModelAux, Transformer, qk_clip_heads

__all__ = [
    "CheckpointError",
    "FIGURE4_GROUPS",
    "PRESETS",
    "ModelAux",
    "ModelConfig",
    "RouterBias",
    "Transformer",
    "abstract_model",
    "balance_router_bias",
    "flops_per_token",
    "from_hf",
    "generate",
    "hf_config",
    "param_counts",
    "preset",
    "qk_clip_heads",
    "svd_entropies",
    "svd_entropy",
    "svd_entropy_by_group",
    "to_hf",
]
