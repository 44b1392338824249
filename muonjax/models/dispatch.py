"""Dropless routed experts: y_t = sum_j w_tj SwiGLU_{e_tj}(x_t), no token dropped.

Four methods, the first three chosen by measurement (experiments/bench_dispatch.py,
experiments/bench_model.py and the notes on issues 3 and 25; "megablox" is not
measured on a TPU yet):

- "tiles": assignments sorted by expert, each expert's group padded to whole
  row tiles (a static number of them), then ONE batched matmul over all tiles,
  each tile against its expert's gathered weights. No loop, so XLA's cost
  analysis counts it (the routed FLOPs plus at most ~6% padding), and nothing
  waits on the host. Its VJP sums the tiles' weight gradients per expert
  (a sorted segment sum). The gathered weights and per-tile weight gradients
  take (T*k/tile + E) x D x F per matrix, transient: the tile is sized so that
  this stays under 33x one expert stack (see `tile_rows`).

- "blocks" (default on CPU): assignments sorted by expert, each expert's group
  padded to whole row blocks, then a loop over the used blocks only, each one a
  plain (block, D) @ (D, F) matmul against its expert's weights. Compute scales
  with the rows actually routed, whatever the imbalance. The loop has a
  hand-written VJP so that its trip count can be data-dependent and weight
  gradients accumulate in place.
- "ragged_dot" (default on GPU/TPU): the sorted rows through
  jax.lax.ragged_dot, which accelerators lower to grouped matmuls. On CPU it
  expands to a dense masked matmul (E times the FLOPs), hence not used there.
- "megablox": the sorted rows through the Pallas TPU grouped matmul that JAX
  ships (jax.experimental.pallas.ops.tpu.megablox, `gmm`, whose VJP is built on
  `tgmm`): one kernel per matrix, visiting only the row tiles that hold each
  expert's rows. Compiled (Mosaic) when lowered for TPU -- also from a CPU host
  compiling for a slice -- and run in Pallas interpret mode elsewhere (slow:
  for tests). Rows past the routed ones (another shard's experts, row padding)
  belong to no group: the kernel leaves them unwritten, so they are masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from muonjax.models.config import AUTO_DISPATCH


def routed_experts(x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD, *, method="auto"):
    """Each token's k chosen SwiGLU experts, weighted and summed."""
    if method == "auto":  # a program on a mesh resolves it for the mesh's devices
        method = AUTO_DISPATCH.get(jax.default_backend(), "ragged_dot")
    T, K = experts_TK.shape
    E = gate_EDF.shape[0]
    if method == "tiles":
        swiglu = lambda x_RD, expert_N, _: tiled_swiglu(x_RD, expert_N, gate_EDF, up_EDF, down_EFD)
        return _in_sorted_rows(swiglu, x_TD, experts_TK, weights_TK, E, tile_rows(T * K, E))
    if method == "megablox":
        return megablox_experts(x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD)
    if method == "ragged_dot":
        flat_N = experts_TK.reshape(-1)
        order_N = jnp.argsort(flat_N, stable=True)
        sizes_E = jnp.bincount(flat_N, length=E).astype(jnp.int32)
        x_ND = x_TD[order_N // K]
        h_NF = jax.nn.silu(lax.ragged_dot(x_ND, gate_EDF, sizes_E)) * lax.ragged_dot(
            x_ND, up_EDF, sizes_E
        )
        y_ND = lax.ragged_dot(h_NF, down_EFD, sizes_E)
        y_ND = y_ND * weights_TK.reshape(-1)[order_N][:, None].astype(y_ND.dtype)
        return jnp.zeros_like(x_TD).at[order_N // K].add(y_ND)
    # Small blocks waste less padding, large ones run faster matmuls on CPU;
    # 128 rows suit groups under ~400 rows per expert (measured). No expert gets
    # more than T rows, so a few tokens (a decode step) need no more than T.
    block = min(128 if T * K < 400 * E else 256, max(8, 1 << (T - 1).bit_length()))
    swiglu = lambda x_RD, expert_B, used_blocks: grouped_swiglu(
        x_RD, expert_B, used_blocks, gate_EDF, up_EDF, down_EFD, block
    )
    return _in_sorted_rows(swiglu, x_TD, experts_TK, weights_TK, E, block)


def _in_sorted_rows(swiglu, x_TD, experts_TK, weights_TK, n_experts: int, block: int):
    """The assignments sorted by expert into whole blocks of rows (`block_layout`),
    `swiglu(x_RD, expert_B, used_blocks)` on those rows, and each row's output,
    weighted, added back to its token."""
    K = experts_TK.shape[1]
    assignment_R, expert_B, used_blocks = block_layout(experts_TK, n_experts, block)
    token_R = assignment_R // K  # == T on padding rows: gathers 0, scatter drops
    x_RD = jnp.take(x_TD, token_R, axis=0, mode="fill", fill_value=0)
    y_RD = swiglu(x_RD, expert_B, used_blocks)
    w_R = jnp.take(weights_TK.reshape(-1), assignment_R, mode="fill", fill_value=0)
    return jnp.zeros_like(x_TD).at[token_R].add(y_RD * w_R[:, None].astype(y_RD.dtype), mode="drop")


def block_layout(experts_TK, n_experts: int, block: int):
    """Sorts the T*k assignments by expert and pads each expert's group to whole blocks.

    Returns assignment_R (the assignment index t*k+j in each of the R padded
    rows, T*k on padding), expert_B (the expert of each block) and used_blocks
    (how many blocks hold rows). R = block * B is a static bound: T*k rows plus
    at most block-1 padding rows per expert. Expert ids >= n_experts (another
    shard's experts) are left out.
    """
    T, K = experts_TK.shape
    N = T * K
    # at most min(E, N) groups are non-empty, each padded by at most block-1 rows
    n_blocks = (N + min(n_experts, N) * (block - 1)) // block
    expert_N = experts_TK.reshape(-1).astype(jnp.int32)
    order_N = jnp.argsort(expert_N, stable=True).astype(jnp.int32)
    count_E = jnp.bincount(expert_N, length=n_experts).astype(jnp.int32)
    padded_E = (count_E + block - 1) // block * block
    padded_end_E = jnp.cumsum(padded_E)
    sorted_expert_N = expert_N[order_N]
    ours_N = sorted_expert_N < n_experts
    e_N = jnp.minimum(sorted_expert_N, n_experts - 1)
    rank_N = jnp.arange(N, dtype=jnp.int32) - (jnp.cumsum(count_E) - count_E)[e_N]
    row_N = jnp.where(ours_N, (padded_end_E - padded_E)[e_N] + rank_N, n_blocks * block)
    assignment_R = jnp.full((n_blocks * block,), N, jnp.int32).at[row_N].set(order_N, mode="drop")
    block_start_B = jnp.arange(n_blocks, dtype=jnp.int32) * block
    expert_B = jnp.minimum(
        # compare_all: E x B comparisons, and no loop (the default method scans)
        jnp.searchsorted(padded_end_E, block_start_B, side="right", method="compare_all"),
        n_experts - 1,
    )
    return assignment_R, expert_B.astype(jnp.int32), padded_end_E[-1] // block


def tile_rows(n_rows: int, n_experts: int) -> int:
    """Rows per tile for `tiles`: the largest power of two with
    E * tile <= n_rows / 16, so that the padding (at most tile-1 rows per expert,
    half that expected) stays under ~6% of the routed rows, and the tiles number
    n_rows / tile + E < 33 E (their gathered weights and per-tile weight
    gradients stay under 33x the expert stack, whatever the batch). A decode
    step (fewer than 32 E rows) gets 1-row tiles: no padding at all.

    On a 2-core CPU, copying the gathered weights dominates at small tiles:
    4x the tile (64 rows against 16 at T=2048, k=2, E=16) runs 3x faster for
    ~10% more FLOPs (experiments/bench_dispatch.py); `blocks` stays faster."""
    tile = 1
    while 2 * tile * n_experts * 16 <= n_rows:
        tile *= 2
    return tile


def _tile_forward(x_NtD, expert_N, gate_EDF, up_EDF, down_EFD):
    g = jnp.einsum("ntd,ndf->ntf", x_NtD, gate_EDF[expert_N])
    u = jnp.einsum("ntd,ndf->ntf", x_NtD, up_EDF[expert_N])
    y = jnp.einsum("ntf,nfd->ntd", jax.nn.silu(g) * u, down_EFD[expert_N])
    return y, g, u


@jax.custom_vjp
def tiled_swiglu(x_RD, expert_N, gate_EDF, up_EDF, down_EFD):
    """Row tile n of x_RD (R = N tiles x tile rows) through expert expert_N[n]'s
    SwiGLU, all tiles in one batched matmul; expert_N must be sorted."""
    n = expert_N.shape[0]
    y, _, _ = _tile_forward(
        x_RD.reshape(n, -1, x_RD.shape[1]), expert_N, gate_EDF, up_EDF, down_EFD
    )
    return y.reshape(x_RD.shape)


def _tiled_swiglu_fwd(x_RD, expert_N, gate_EDF, up_EDF, down_EFD):
    n = expert_N.shape[0]
    x = x_RD.reshape(n, -1, x_RD.shape[1])
    y, g, u = _tile_forward(x, expert_N, gate_EDF, up_EDF, down_EFD)
    # the gathered weights are not kept: the backward pass gathers them again
    return y.reshape(x_RD.shape), (x, expert_N, gate_EDF, up_EDF, down_EFD, g, u)


def _tiled_swiglu_bwd(residuals, dy_RD):
    x, expert_N, gate_EDF, up_EDF, down_EFD, g, u = residuals
    E = gate_EDF.shape[0]
    dy = dy_RD.reshape(x.shape)
    sig = jax.nn.sigmoid(g)
    act = g * sig  # silu(g)
    dh = jnp.einsum("ntd,nfd->ntf", dy, down_EFD[expert_N])
    dg = dh * u * sig * (1 + g * (1 - sig))  # silu'(g) = sig (1 + g (1 - sig))
    du = dh * act
    dx = jnp.einsum("ntf,ndf->ntd", dg, gate_EDF[expert_N]) + jnp.einsum(
        "ntf,ndf->ntd", du, up_EDF[expert_N]
    )
    # each tile's weight gradient, summed per expert (tiles are sorted by expert)
    per_expert = lambda w_N: jax.ops.segment_sum(w_N, expert_N, E, indices_are_sorted=True)
    dgate = per_expert(jnp.einsum("ntd,ntf->ndf", x, dg))
    dup = per_expert(jnp.einsum("ntd,ntf->ndf", x, du))
    ddown = per_expert(jnp.einsum("ntf,ntd->nfd", act * u, dy))
    return (
        dx.reshape(dy_RD.shape),
        None,
        dgate.astype(gate_EDF.dtype),
        dup.astype(up_EDF.dtype),
        ddown.astype(down_EFD.dtype),
    )


tiled_swiglu.defvjp(_tiled_swiglu_fwd, _tiled_swiglu_bwd)


def _take(w, e):
    return lax.dynamic_index_in_dim(w, e, 0, keepdims=False)


def _forward_blocks(x_RD, expert_B, used_blocks, gate_EDF, up_EDF, down_EFD, block):
    def body(b, carry):
        e, x = expert_B[b], lax.dynamic_slice_in_dim(x_RD, b * block, block)
        g, u = x @ _take(gate_EDF, e), x @ _take(up_EDF, e)
        y = (jax.nn.silu(g) * u) @ _take(down_EFD, e)
        return tuple(
            lax.dynamic_update_slice_in_dim(a, v, b * block, 0) for a, v in zip(carry, (y, g, u))
        )

    R, F = x_RD.shape[0], gate_EDF.shape[-1]
    zeros = (
        jnp.zeros((R, x_RD.shape[1]), x_RD.dtype),
        jnp.zeros((R, F), x_RD.dtype),
        jnp.zeros((R, F), x_RD.dtype),
    )
    return lax.fori_loop(0, used_blocks, body, zeros)  # rows past used_blocks stay 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def grouped_swiglu(x_RD, expert_B, used_blocks, gate_EDF, up_EDF, down_EFD, block):
    """Row block b of x_RD through expert expert_B[b]'s SwiGLU; blocks from
    used_blocks on are skipped and give 0."""
    return _forward_blocks(x_RD, expert_B, used_blocks, gate_EDF, up_EDF, down_EFD, block)[0]


def _grouped_swiglu_fwd(x_RD, expert_B, used_blocks, gate_EDF, up_EDF, down_EFD, block):
    y, g, u = _forward_blocks(x_RD, expert_B, used_blocks, gate_EDF, up_EDF, down_EFD, block)
    return y, (x_RD, expert_B, used_blocks, gate_EDF, up_EDF, down_EFD, g, u)


def _grouped_swiglu_bwd(block, residuals, dy_RD):
    x_RD, expert_B, used_blocks, gate_EDF, up_EDF, down_EFD, g_RF, u_RF = residuals

    def body(b, carry):
        dx_RD, dgate, dup, ddown = carry
        e = expert_B[b]
        rows = lambda a: lax.dynamic_slice_in_dim(a, b * block, block)
        x, g, u, dy = rows(x_RD), rows(g_RF), rows(u_RF), rows(dy_RD)
        sig = jax.nn.sigmoid(g)
        act = g * sig  # silu(g)
        dh = dy @ _take(down_EFD, e).T
        dg = dh * u * sig * (1 + g * (1 - sig))  # silu'(g) = sig (1 + g (1 - sig))
        du = dh * act
        dx = dg @ _take(gate_EDF, e).T + du @ _take(up_EDF, e).T
        accumulate = lambda w, v: lax.dynamic_update_index_in_dim(w, _take(w, e) + v, e, 0)
        return (
            lax.dynamic_update_slice_in_dim(dx_RD, dx, b * block, 0),
            accumulate(dgate, x.T @ dg),
            accumulate(dup, x.T @ du),
            accumulate(ddown, (act * u).T @ dy),
        )

    zeros = tuple(jnp.zeros_like(a) for a in (x_RD, gate_EDF, up_EDF, down_EFD))
    dx_RD, dgate, dup, ddown = lax.fori_loop(0, used_blocks, body, zeros)
    return dx_RD, None, None, dgate, dup, ddown


grouped_swiglu.defvjp(_grouped_swiglu_fwd, _grouped_swiglu_bwd)


def megablox_experts(x_TD, experts_TK, weights_TK, gate_EDF, up_EDF, down_EFD):
    """`routed_experts` by megablox: the T*k assignments sorted by expert into
    R = `gmm_rows(T*k)` rows, expert e's sizes_E[e] rows through its SwiGLU
    (`gmm_swiglu`), each row's output weighted and added to its token in float32.

    Rows from sum(sizes_E) on (ids >= E, another shard's experts, sort last;
    then the padding) are in no group: gmm leaves them unwritten (NaN in
    interpret mode), so `where` zeroes them (0 * NaN would be NaN) on the way
    out, and on the way in, which also drops what gmm's VJP leaves in their dx.
    """
    T, K = experts_TK.shape
    E, N = gate_EDF.shape[0], T * K
    expert_N = experts_TK.reshape(-1)
    order_N = jnp.argsort(expert_N, stable=True).astype(jnp.int32)
    assignment_R = jnp.pad(order_N, (0, gmm_rows(N) - N), constant_values=N)
    sizes_E = jnp.bincount(expert_N, length=E).astype(jnp.int32)  # ids >= E: no group
    routed_R1 = (jnp.arange(assignment_R.shape[0]) < jnp.sum(sizes_E))[:, None]
    token_R = assignment_R // K  # == T on padding rows: gathers 0, scatter drops
    x_RD = jnp.where(routed_R1, jnp.take(x_TD, token_R, axis=0, mode="fill", fill_value=0), 0)
    # interpret mode unless lowered for TPU: a CPU host compiling for a TPU
    # slice gets the Mosaic kernel (jax.default_backend() would say cpu)
    y_RD = lax.platform_dependent(
        x_RD,
        sizes_E,
        gate_EDF,
        up_EDF,
        down_EFD,
        tpu=functools.partial(gmm_swiglu, interpret=False),
        default=functools.partial(gmm_swiglu, interpret=True),
    )
    w_R = jnp.take(weights_TK.reshape(-1), assignment_R, mode="fill", fill_value=0)
    y_RD = jnp.where(routed_R1, y_RD.astype(jnp.float32), 0) * w_R[:, None].astype(jnp.float32)
    y_TD = jnp.zeros(x_TD.shape, jnp.float32).at[token_R].add(y_RD, mode="drop")
    return y_TD.astype(x_TD.dtype)


def gmm_swiglu(x_RD, sizes_E, gate_EDF, up_EDF, down_EFD, *, interpret: bool):
    """Group e's rows (sizes_E[e] of them, in expert order) through expert e's
    SwiGLU: three megablox gmm calls. Rows past sum(sizes_E) are left unwritten.

    The kernel accumulates every tile in float32 whatever dtype it stores; it
    stores the input dtype, so that the VJP's matmuls, which take the
    cotangents' dtype, stay bfloat16 x bfloat16 on bfloat16 weights."""

    def gmm(a_RX, w_EXY):
        # positional: megablox.gmm is a custom_vjp with static args 3, 4, 7, 8
        return megablox.gmm(
            a_RX, w_EXY, sizes_E, a_RX.dtype, gmm_tiling, None, None, False, interpret
        )

    h_RF = jax.nn.silu(gmm(x_RD, gate_EDF)) * gmm(x_RD, up_EDF)
    return gmm(h_RF, down_EFD)


def gmm_rows(n_rows: int) -> int:
    """n_rows padded to whole gmm row tiles: 128 rows (megablox's default tile),
    or for fewer rows (a decode step) one tile of the next power of two >= 16
    (bfloat16 packs 16 rows per vector register)."""
    tile = min(128, max(16, 1 << (n_rows - 1).bit_length()))
    return -(-n_rows // tile) * tile


def gmm_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """Tiles (rows, contraction, output) for an (m, k) @ (k, n) gmm or tgmm.

    Rows: the largest power of two <= 128 dividing m (`gmm_rows`'s tile). k and
    n: the largest of 512, 256, 128 dividing them (Mosaic blocks span whole
    multiples of 128 lanes or the whole dim), else the whole dim (the tiny test
    presets): D=2048 and F=2048 get 512, F=1408 (11 x 128) gets 128, D=7168
    (14 x 512) 512. A function of the dims, not one tuple, because the VJP's
    gmm (k and n swapped) and tgmm reuse it on their own dims."""
    dim_tile = lambda d: next((t for t in (512, 256, 128) if d % t == 0), d)
    return min(128, m & -m), dim_tile(k), dim_tile(n)
