"""Model configuration: one frozen dataclass, and named presets."""

from __future__ import annotations

import dataclasses

ATTENTION_KINDS = ("mla", "mha")
DISPATCH_METHODS = ("auto", "blocks", "ragged_dot")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Moonlight / DeepSeek-V3-style MoE transformer.

    Layers [0, first_k_dense) use a dense SwiGLU MLP of width
    `intermediate_size`; the rest are MoE layers with `n_routed_experts`
    SwiGLU experts of width `moe_intermediate_size` (top `experts_per_token`
    by sigmoid score plus a selection-only bias) and `n_shared_experts` shared
    experts fused into one SwiGLU of width n_shared * moe_intermediate_size.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    first_k_dense: int = 1
    intermediate_size: int = 256
    n_heads: int = 4
    attention: str = "mla"  # "mla" (DeepSeek-V2/V3) or "mha"
    head_dim: int = 16  # mha only
    q_lora_rank: int | None = None  # mla: None = full-rank query projection
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    n_routed_experts: int = 8
    experts_per_token: int = 2
    moe_intermediate_size: int = 64
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    moe_dispatch: str = "auto"  # "blocks" (CPU), "ragged_dot" (GPU/TPU), "auto" picks
    aux_loss_coef: float = 1e-4  # sequence-wise balance loss (Moonlight: 1e-4)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    # MLA's q_a / kv_a latent norms: DeepseekV3 builds them with 1e-6 whatever
    # rms_norm_eps is (Moonlight: 1e-5), so Hugging Face checkpoints match exactly.
    latent_norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "float32"  # activations and matmuls; params stay float32
    remat: bool = False  # recompute each layer in the backward pass instead of storing it

    def __post_init__(self):
        errors = []
        if self.attention not in ATTENTION_KINDS:
            errors.append(f"attention={self.attention!r} (valid: {', '.join(ATTENTION_KINDS)})")
        if self.moe_dispatch not in DISPATCH_METHODS:
            errors.append(
                f"moe_dispatch={self.moe_dispatch!r} (valid: {', '.join(DISPATCH_METHODS)})"
            )
        if not 0 <= self.first_k_dense <= self.n_layers:
            errors.append(
                f"first_k_dense={self.first_k_dense} (valid: 0..n_layers={self.n_layers})"
            )
        if not 1 <= self.experts_per_token <= self.n_routed_experts:
            errors.append(
                f"experts_per_token={self.experts_per_token} "
                f"(valid: 1..n_routed_experts={self.n_routed_experts})"
            )
        if self.qk_rope_head_dim % 2:
            errors.append(f"qk_rope_head_dim={self.qk_rope_head_dim} (must be even)")
        if self.attention == "mha" and self.head_dim % 2:
            errors.append(f"head_dim={self.head_dim} (must be even for rotary embeddings)")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} (must be positive)")
        if errors:
            raise ValueError("Invalid ModelConfig: " + "; ".join(errors) + ".")

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.first_k_dense

    @property
    def qk_head_dim(self) -> int:
        if self.attention == "mha":
            return self.head_dim
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


PRESETS = {
    # Trains in seconds on a CPU: a byte-level model with one dense and one
    # MoE layer.
    "tiny": ModelConfig(),
    # A few minutes for a few hundred steps on a 2-core CPU.
    "small": ModelConfig(
        d_model=256,
        n_layers=4,
        first_k_dense=1,
        intermediate_size=1024,
        n_heads=8,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        experts_per_token=2,
        moe_intermediate_size=256,
        n_shared_experts=1,
    ),
    # Moonlight-16B-A3B (moonshotai/Moonlight-16B-A3B config.json).
    "moonlight-16b-a3b": ModelConfig(
        vocab_size=163840,
        d_model=2048,
        n_layers=27,
        first_k_dense=1,
        intermediate_size=11264,
        n_heads=16,
        attention="mla",
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        experts_per_token=6,
        moe_intermediate_size=1408,
        n_shared_experts=2,
        routed_scaling_factor=2.446,
        norm_topk_prob=True,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        dtype="bfloat16",
        remat=True,
    ),
}


def preset(name: str) -> ModelConfig:
    """The named preset's config; an unknown name lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"Unknown model preset {name!r}; known presets: {', '.join(PRESETS)}."
        ) from None
