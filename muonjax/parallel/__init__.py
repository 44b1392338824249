"""Meshes, logical-axis rules, ZeRO-1 shardings, the expert- and data-parallel
code of the model side (parallel.experts, parallel.gradients), cluster launch
and compiled-program inspection."""

from muonjax.parallel.mesh import (
    AXES,
    BATCH_AXES,
    MeshError,
    check_batch,
    make_mesh,
    parse_mesh,
    run_mesh,
)
from muonjax.parallel.sharding import RULES, Plan

__all__ = [
    "AXES",
    "BATCH_AXES",
    "RULES",
    "MeshError",
    "Plan",
    "check_batch",
    "make_mesh",
    "parse_mesh",
    "run_mesh",
]
