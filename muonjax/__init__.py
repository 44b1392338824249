"""muonjax: the Muon optimizer at scale, in JAX (Moonshot AI & UCLA, 2025).

import muonjax
tx = muonjax.moonlight(learning_rate=4.2e-4)   # Muon + AdamW, Moonlight recipe
params = muonjax.apply_qk_clip(params, max_logits_LH, 100.0, heads)  # QK-Clip: muonjax.optim.qk_clip

The optimizer needs only jax and optax; `nnx_matrix_axes` (Flax NNX models)
imports flax when first used.
"""

from muonjax.optim import (
    ADAMW_NAMES,
    JORDAN,
    POLAR_EXPRESS,
    UPDATE_SCALE_RULES,
    MatrixAxes,
    QKHeads,
    ScaleByMuonState,
    apply_qk_clip,
    moonlight,
    moonlight_labels,
    muon,
    muon_momentum,
    newton_schulz_flops,
    orthogonalize,
    orthogonalize_spread,
    qk_clip,
    qk_clip_factors,
    routing_table,
    scale_by_muon,
    scale_by_shape,
    weight_decay_mask,
    zero1_sharding,
    zero1_state_shardings,
)

__version__ = "0.1.0"

__all__ = [
    "ADAMW_NAMES",
    "JORDAN",
    "POLAR_EXPRESS",
    "QKHeads",
    "UPDATE_SCALE_RULES",
    "MatrixAxes",
    "ScaleByMuonState",
    "apply_qk_clip",
    "moonlight",
    "moonlight_labels",
    "muon",
    "muon_momentum",
    "newton_schulz_flops",
    "nnx_matrix_axes",
    "orthogonalize",
    "orthogonalize_spread",
    "qk_clip",
    "qk_clip_factors",
    "routing_table",
    "scale_by_muon",
    "scale_by_shape",
    "weight_decay_mask",
    "zero1_sharding",
    "zero1_state_shardings",
]


def __getattr__(name):
    if name == "nnx_matrix_axes":  # imported here: the optimizer alone installs without flax
        try:
            from muonjax.nnx_axes import nnx_matrix_axes
        except ModuleNotFoundError as missing:
            if missing.name != "flax":
                raise
            raise ModuleNotFoundError(
                "muonjax.nnx_matrix_axes reads Flax NNX models and needs flax: "
                "pip install 'muonjax[train]' (or flax)",
                name="flax",
            ) from None
        return nnx_matrix_axes
    raise AttributeError(f"module 'muonjax' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__})
