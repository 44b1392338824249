"""Meshes, logical-axis rules, ZeRO-1 shardings and compiled-program inspection."""

from muonjax.parallel.mesh import AXES, MeshError, make_mesh, parse_mesh
from muonjax.parallel.sharding import RULES, Plan

__all__ = ["AXES", "RULES", "MeshError", "Plan", "make_mesh", "parse_mesh"]
