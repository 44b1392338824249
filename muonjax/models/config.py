"""Model configuration: one frozen dataclass, and named presets."""

from __future__ import annotations

import dataclasses
import math

ATTENTION_KINDS = ("mla", "mha")
DISPATCH_METHODS = ("auto", "blocks", "tiles", "ragged_dot", "megablox")
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash")
# moe_dispatch "auto" by jax.Device.platform (see muonjax.models.dispatch; TPU:
# megablox, MaxText's choice there, unmeasured here: no TPU has run muonjax)
AUTO_DISPATCH = {"cpu": "blocks", "gpu": "ragged_dot", "tpu": "megablox"}
COMPUTE_DTYPES = ("float32", "bfloat16")
# what the backward pass recomputes: nothing (store every activation), everything
# but the matmul outputs ("dots"), or each layer whole from its input ("full")
REMAT_POLICIES = ("none", "dots", "full")


def remat_policy(value):
    """A remat setting as its policy's name: True (the old bool) is "full", False "none";
    anything else unchanged (checked against REMAT_POLICIES by the caller)."""
    if isinstance(value, bool):
        return "full" if value else "none"
    return value


class InvalidModelConfig(ValueError):
    """A ModelConfig with bad fields; `problems` lists (field, "field=value (why)")."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("Invalid ModelConfig: " + "; ".join(text for _, text in problems) + ".")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Moonlight / DeepSeek-V3-style MoE transformer.

    Layers [0, first_k_dense) use a dense SwiGLU MLP of width
    `intermediate_size`; the rest are MoE layers with `n_routed_experts`
    SwiGLU experts of width `moe_intermediate_size` (top `experts_per_token`
    by sigmoid score plus a selection-only bias) and `n_shared_experts` shared
    experts fused into one SwiGLU of width n_shared * moe_intermediate_size.

    Every field's type and range is checked on construction: InvalidModelConfig
    (a ValueError) names each bad field.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    first_k_dense: int = 1
    intermediate_size: int = 256
    n_heads: int = 4
    attention: str = "mla"  # "mla" (DeepSeek-V2/V3) or "mha"
    head_dim: int = 16  # mha only
    # "xla" / "cudnn" (jax.nn.dot_product_attention's), "splash" (Pallas TPU);
    # "auto" picks by the device (kernels_for)
    attention_kernel: str = "auto"
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
    moe_dispatch: str = "auto"  # a DISPATCH_METHODS name; "auto" picks by the device (kernels_for)
    aux_loss_coef: float = 1e-4  # sequence-wise balance loss (Moonlight: 1e-4)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    # MLA's q_a / kv_a latent norms: DeepseekV3 builds them with 1e-6 whatever
    # rms_norm_eps is (Moonlight: 1e-5), so Hugging Face checkpoints match exactly.
    latent_norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "float32"  # activations and matmuls; params stay float32
    # the backward pass recomputes: "none" nothing, "dots" all but the matmul outputs,
    # "full" each layer whole from its input (True and False, from older configs: full, none)
    remat: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_policy(self.remat))
        problems = _field_problems(self)
        problems += _relation_problems(self, {name for name, _ in problems})
        if problems:
            raise InvalidModelConfig(problems)

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

    def kernels_for(self, device) -> ModelConfig:
        """This config with its "auto" kernels chosen for `device` (a jax.Device:
        the program's, which may be a TPU chip compiled for from a CPU host):
        experts by AUTO_DISPATCH; attention by splash on a TPU, cuDNN's flash
        attention on a GPU in bfloat16 for head dims it takes (a multiple of 8,
        at most 256 from Hopper on, 128 before), XLA's path elsewhere."""
        changes = {}
        if self.moe_dispatch == "auto":
            changes["moe_dispatch"] = AUTO_DISPATCH.get(device.platform, "ragged_dot")
        if self.attention_kernel == "auto":
            changes["attention_kernel"] = self._auto_attention(device)
        return self.replace(**changes)

    def _auto_attention(self, device) -> str:
        if device.platform == "tpu":
            return "splash"
        if device.platform != "gpu" or self.dtype != "bfloat16":
            return "xla"
        head_dim = (
            self.head_dim if self.attention == "mha" else max(self.qk_head_dim, self.v_head_dim)
        )
        most = 256 if float(getattr(device, "compute_capability", "0")) >= 9 else 128
        return "cudnn" if head_dim % 8 == 0 and head_dim <= most else "xla"


# Each field's rule: ints and their least valid value (every dimension >= 1), floats
# that must be > 0 or >= 0, bools, and strings with their choices.
_MIN_INT = {
    "vocab_size": 1,
    "d_model": 1,
    "n_layers": 1,
    "first_k_dense": 0,
    "intermediate_size": 1,
    "n_heads": 1,
    "head_dim": 1,
    "kv_lora_rank": 1,
    "qk_nope_head_dim": 1,
    "qk_rope_head_dim": 2,
    "v_head_dim": 1,
    "n_routed_experts": 1,
    "experts_per_token": 1,
    "moe_intermediate_size": 1,
    "n_shared_experts": 0,
}
_POSITIVE_FLOATS = ("routed_scaling_factor", "rope_theta", "rms_norm_eps", "latent_norm_eps")
_NONNEGATIVE_FLOATS = ("aux_loss_coef", "init_std")
_BOOLS = ("norm_topk_prob",)
_CHOICES = {
    "attention": ATTENTION_KINDS,
    "moe_dispatch": DISPATCH_METHODS,
    "attention_kernel": ATTENTION_KERNELS,
    "dtype": COMPUTE_DTYPES,
    "remat": REMAT_POLICIES,
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _field_problems(c: ModelConfig) -> list[tuple[str, str]]:
    """Each field's type and range on its own: (field, "field=value (why)")."""
    problems = []
    for name, least in _MIN_INT.items():
        value = getattr(c, name)
        if not _is_int(value):
            problems.append((name, f"{name}={value!r} (must be an integer)"))
        elif value < least:
            need = "positive" if least == 1 else f">= {least}"
            problems.append((name, f"{name}={value} (must be {need})"))
    if c.q_lora_rank is not None and not (_is_int(c.q_lora_rank) and c.q_lora_rank >= 1):
        problems.append(
            ("q_lora_rank", f"q_lora_rank={c.q_lora_rank!r} (must be None or a positive integer)")
        )
    for name in _POSITIVE_FLOATS + _NONNEGATIVE_FLOATS:
        value = getattr(c, name)
        positive = name in _POSITIVE_FLOATS
        if not _is_number(value) or (value <= 0 if positive else value < 0):
            need = "positive" if positive else ">= 0"
            problems.append((name, f"{name}={value!r} (must be {need} and finite)"))
    for name in _BOOLS:
        if not isinstance(getattr(c, name), bool):
            problems.append((name, f"{name}={getattr(c, name)!r} (must be true or false)"))
    for name, choices in _CHOICES.items():
        if getattr(c, name) not in choices:
            problems.append((name, f"{name}={getattr(c, name)!r} (valid: {', '.join(choices)})"))
    return problems


def _relation_problems(c: ModelConfig, bad: set[str]) -> list[tuple[str, str]]:
    """Rules between fields, among those whose own values are valid (`bad`: the others)."""
    fine = lambda *names: not bad.intersection(names)
    problems = []
    if fine("first_k_dense", "n_layers") and c.first_k_dense > c.n_layers:
        problems.append(
            ("first_k_dense", f"first_k_dense={c.first_k_dense} (valid: 0..n_layers={c.n_layers})")
        )
    if fine("experts_per_token", "n_routed_experts") and c.experts_per_token > c.n_routed_experts:
        problems.append(
            (
                "experts_per_token",
                f"experts_per_token={c.experts_per_token} "
                f"(valid: 1..n_routed_experts={c.n_routed_experts})",
            )
        )
    if fine("qk_rope_head_dim") and c.qk_rope_head_dim % 2:
        problems.append(
            ("qk_rope_head_dim", f"qk_rope_head_dim={c.qk_rope_head_dim} (must be even)")
        )
    if fine("attention", "head_dim") and c.attention == "mha" and c.head_dim % 2:
        problems.append(("head_dim", f"head_dim={c.head_dim} (must be even for rotary embeddings)"))
    return problems


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
        remat="full",
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
