"""SVD entropy of weight matrices (paper Sec. 3.4, Figure 4), and the paper's
groups of the model's hidden matrices.

    H(sigma) = -1/log(n) sum_i p_i log p_i,   p_i = sigma_i^2 / sum_j sigma_j^2

over the n = min(rows, cols) singular values of a matrix: 1 when every
direction carries the same energy (an orthogonal matrix), 0 for rank one. The
paper finds it higher under Muon than AdamW in every group, most of all in the
router: Muon's orthogonalized updates spread over more directions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from muonjax.optim.matrix_axes import MatrixAxesFn, matrix_view
from muonjax.optim.paths import path_names
from muonjax.optim.recipes import MUON, moonlight_labels

# A hidden matrix's group (the paper's Table 1 names), by the innermost module
# on its path that names one: attention projections of MLA and MHA, the dense
# layers' MLP, routed and shared experts, the router.
MATRIX_GROUPS = {
    "q_proj": "AttnQ",
    "q_a_proj": "AttnQ",
    "q_b_proj": "AttnQ",
    "k_proj": "AttnKV",
    "v_proj": "AttnKV",
    "kv_a_proj": "AttnKV",
    "kv_b_proj": "AttnKV",
    "o_proj": "AttnO",
    "mlp": "Dense",
    "experts": "Experts",
    "shared": "SharedExperts",
    "router": "Router",
}
# Figure 4's groups: query and output projections together.
FIGURE4_GROUPS = ("AttnQO", "AttnKV", "Experts", "SharedExperts", "Router", "Dense")
_TO_FIGURE4 = {"AttnQ": "AttnQO", "AttnO": "AttnQO"}


def matrix_group(names: tuple[str, ...]) -> str | None:
    """The group (AttnQ, AttnKV, AttnO, Dense, Experts, SharedExperts, Router)
    of the hidden matrix at the path `names`, or None."""
    return next((MATRIX_GROUPS[k] for k in reversed(names) if k in MATRIX_GROUPS), None)


def figure4_group(names: tuple[str, ...]) -> str | None:
    """`matrix_group` with query and output together: Figure 4's groups."""
    group = matrix_group(names)
    return _TO_FIGURE4.get(group, group)


def hidden_matrices(params: Any) -> list[tuple[Any, str, Any]]:
    """(tree path, group, leaf) for each leaf `moonlight_labels` sends to Muon
    and `matrix_group` places: the matrices and stacks Muon orthogonalizes."""
    labels = jax.tree.leaves(moonlight_labels(params))
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return [
        (path, group, leaf)
        for (path, leaf), label in zip(leaves, labels)
        if label == MUON and (group := matrix_group(path_names(path))) is not None
    ]


def _singular_values(x: jax.Array) -> jax.Array:
    """The singular values of each matrix of a stack (..., A, B).

    On CPU one matrix per LAPACK call, in a loop: jaxlib's CPU kernel splits a
    batch over XLA's thread pool and blocks a worker until it is done, so with
    several SVDs or devices at once every worker can end up waiting (a
    deadlock); a single matrix is never split. The loop gathers a stack split
    over devices, which CPU meshes (tests, small runs) afford. Elsewhere the
    stack is one batched call, partitioned along its stack axes."""
    batched = lambda x: jnp.linalg.svd(x, compute_uv=False)

    def one_at_a_time(x):
        flat = x.reshape(-1, *x.shape[-2:])
        return jax.lax.map(batched, flat).reshape(*x.shape[:-2], -1)

    return jax.lax.platform_dependent(x, cpu=one_at_a_time, default=batched)


def svd_entropy(matrix: jax.Array) -> jax.Array:
    """The SVD entropy of a matrix, or of each matrix of a stack (the last two
    axes are the matrix): shape matrix.shape[:-2], in float32 (float64 for
    float64 input). n = min(rows, cols); 0 log 0 = 0, so rank-deficient
    matrices are fine (a zero matrix has entropy 0)."""
    matrix = jnp.asarray(matrix)  # float64 stays float64 only where x64 is on
    if matrix.ndim < 2 or min(matrix.shape[-2:]) < 2:
        raise ValueError(
            f"svd_entropy needs matrices (the last two axes) with at least 2 rows and 2 "
            f"columns, got shape {tuple(matrix.shape)}"
        )
    dtype = jnp.float64 if matrix.dtype == jnp.float64 else jnp.float32
    s = _singular_values(matrix.astype(dtype))
    s = s / jnp.maximum(jnp.max(s, axis=-1, keepdims=True), jnp.finfo(dtype).tiny)  # no overflow
    energy = jnp.square(s)
    total = jnp.sum(energy, axis=-1, keepdims=True)
    p = energy / jnp.where(total > 0, total, 1)
    n = min(matrix.shape[-2:])
    return -jnp.sum(jax.scipy.special.xlogy(p, p), axis=-1) / jnp.log(jnp.asarray(n, dtype))


def _entropies(params: Any, matrix_axes: MatrixAxesFn | None):
    """("path/of/leaf", group, entropies) per hidden matrix leaf, read as Muon reads it."""
    for path, group, leaf in hidden_matrices(params):
        axes = None if matrix_axes is None else matrix_axes(path, leaf)
        matrices = matrix_view(leaf.shape, axes).to_matrix(leaf)
        yield "/".join(path_names(path)), group, svd_entropy(matrices)


def svd_entropies(params: Any, matrix_axes: MatrixAxesFn | None = None) -> dict[str, jax.Array]:
    """{"path/of/leaf": entropy of each of its matrices} over the hidden
    matrices (`hidden_matrices`): one entropy per layer of a scanned stack and
    per expert, shape = the leaf's stack shape. Each leaf is read as a matrix
    the way Muon reads it (`matrix_axes`, default: the last two axes)."""
    return {name: h for name, _, h in _entropies(params, matrix_axes)}


def svd_entropy_by_group(
    params: Any, matrix_axes: MatrixAxesFn | None = None
) -> dict[str, jax.Array]:
    """{Figure 4 group: mean SVD entropy} over every matrix of the group, each
    layer's and each expert's its own (the paper's macro-average; it sampled 3
    of 64 experts, we take all). Groups the model lacks are left out. Jit it
    on sharded params: on accelerators stacks stay split over their stack axes."""
    by_group: dict[str, list] = {}
    for _, group, h in _entropies(params, matrix_axes):
        by_group.setdefault(_TO_FIGURE4.get(group, group), []).append(h.ravel())
    return {g: jnp.mean(jnp.concatenate(by_group[g])) for g in FIGURE4_GROUPS if g in by_group}
