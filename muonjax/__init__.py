"""muonjax: the Muon optimizer at scale, in JAX (Moonshot AI & UCLA, 2025).

import muonjax
tx = muonjax.moonlight(learning_rate=4.2e-4)   # Muon + AdamW, Moonlight recipe
"""

from muonjax.optim import (
    JORDAN,
    POLAR_EXPRESS,
    UPDATE_SCALE_RULES,
    MatrixAxes,
    ScaleByMuonState,
    moonlight,
    moonlight_labels,
    muon,
    newton_schulz_flops,
    orthogonalize,
    scale_by_muon,
    scale_by_shape,
    weight_decay_mask,
)

__version__ = "0.1.0"

__all__ = [
    "JORDAN",
    "POLAR_EXPRESS",
    "UPDATE_SCALE_RULES",
    "MatrixAxes",
    "ScaleByMuonState",
    "moonlight",
    "moonlight_labels",
    "muon",
    "newton_schulz_flops",
    "orthogonalize",
    "scale_by_muon",
    "scale_by_shape",
    "weight_decay_mask",
]
