"""Pure optax + jax: Newton-Schulz, Muon, and the Moonlight recipe.

Imports jax and optax only, so the optimizer can be used without the rest of
muonjax (no flax, no meshes).
"""

from muonjax.optim.distributed import orthogonalize_spread
from muonjax.optim.matrix_axes import MatrixAxes
from muonjax.optim.muon import (
    UPDATE_SCALE_RULES,
    ScaleByMuonState,
    muon,
    muon_momentum,
    scale_by_muon,
    scale_by_shape,
)
from muonjax.optim.newton_schulz import (
    JORDAN,
    POLAR_EXPRESS,
    newton_schulz_flops,
    orthogonalize,
)
from muonjax.optim.qk_clip import QKHeads, apply_qk_clip, qk_clip, qk_clip_factors
from muonjax.optim.recipes import ADAMW_NAMES, moonlight, moonlight_labels, weight_decay_mask
from muonjax.optim.routing_table import routing_table
from muonjax.optim.zero1 import zero1_sharding, zero1_state_shardings

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
