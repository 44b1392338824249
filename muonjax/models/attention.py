"""Causal self-attention: MLA (DeepSeek-V2/V3 multi-head latent attention) and MHA.

Both return the output and per-head statistics of the pre-softmax logits: the
maximum, the quantity QK-Clip watches (Moonlight / Kimi K2), and how many
exceed a threshold (the paper's "large attention logits ratio", App. D).
For generation, `decode` runs a chunk of new tokens against a cache of the
earlier ones (MLA caches only its latent and shared rotary key).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from muonjax.models.config import ModelConfig
from muonjax.models.layers import Linear, RMSNorm, rope

LARGE_LOGIT = 100.0  # the paper's threshold for a large attention logit (App. D)


class LogitStats(NamedTuple):
    """Per head, over a batch's valid (causal) logits q k^T * scale; the model
    stacks them over layers to (L, H)."""

    max_logit: jax.Array  # (H,) float32: the largest logit
    n_large: jax.Array  # (H,) float32: how many logits exceed `large_logit`


STATS_CHUNK = 512  # query rows per pass of `logit_stats`: its logits are (B, H, 512, <= L)


def causal_attention(q_BLHK, k_BLHK, v_BLHV, scale: float, kernel: str = "xla"):
    """softmax(q k^T * scale + causal mask) v: kernel "splash" is Pallas TPU
    splash attention (`splash_attention`), the others `jax.nn.dot_product_attention`'s:
    "cudnn" cuDNN's fused flash attention (GPU, bfloat16: nothing L x L in
    memory, the masked half skipped), "xla" its plain XLA path. For those a
    value head dim other than the query's (MLA) is padded with zeros to it,
    which the API requires, and cut off the output."""
    if kernel == "splash":
        return splash_attention(q_BLHK, k_BLHK, v_BLHV, scale)
    K, V = q_BLHK.shape[-1], v_BLHV.shape[-1]
    pad = lambda t, n: jnp.pad(t, [(0, 0)] * 3 + [(0, n - t.shape[-1])])  # noqa: E731
    width = max(K, V)
    q, k, v = pad(q_BLHK, width), pad(k_BLHK, width), pad(v_BLHV, width)
    out_BLHX = jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, implementation=kernel
    )
    return out_BLHX[..., :V]


# (q_BLHK, k_BLHK, v_BLHV, scale, kernel) -> out_BLHV: how the attention modules
# compute causal attention, by default `causal_attention` on this device;
# muonjax.parallel hands in a sharded one (muonjax.models.transformer.with_kernels)
Attend = Callable[..., jax.Array]

SPLASH_LANES = 128  # splash's key blocks are multiples of this (a TPU vector's lanes)
SPLASH_BLOCKS = (512, 256, 128)  # query and key rows per block: the largest that divides the length


def splash_attention(q_BLHK, k_BLHK, v_BLHV, scale: float):
    """causal_attention by splash attention, compiled (Mosaic) where the program
    is lowered for a TPU and interpreted elsewhere: the platform compiled for
    decides, not the host's default backend, so a CPU host compiles TPU
    programs with the kernel. Splash has no scale (q is scaled first) and takes
    the query/key and value head dims as they are (MLA's differ), but its
    lengths must be multiples of its blocks: rows of zeros pad the end, which
    no real query sees (the mask is causal) and which are cut off the output."""
    _, length, H, _ = q_BLHK.shape
    padded = -(-length // SPLASH_LANES) * SPLASH_LANES
    block = next(b for b in SPLASH_BLOCKS if padded % b == 0)
    kernels = {
        interpret: jax.vmap(_splash_kernel(H, padded, block, interpret))
        for interpret in (False, True)
    }
    q, k, v = (_heads_first(t, padded) for t in (q_BLHK * scale, k_BLHK, v_BLHV))
    out_BHLV = jax.lax.platform_dependent(q, k, v, tpu=kernels[False], default=kernels[True])
    return out_BHLV.swapaxes(1, 2)[:, :length]


def _heads_first(x_BLHX, length: int):
    """x (B, L, H, X) -> (B, H, length, X), zeros after its L rows."""
    padding = [(0, 0), (0, length - x_BLHX.shape[1]), (0, 0), (0, 0)]
    return jnp.pad(x_BLHX, padding).swapaxes(1, 2)


def _splash_kernel(n_heads: int, length: int, block: int, interpret: bool):
    """splash's causal multi-head kernel for one sequence (H, length, K), every
    block (forward, dq, dkv) `block` rows square."""
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * n_heads)
    return splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def logit_stats(q_BLHK, k_BLHK, scale: float, large_logit: float = LARGE_LOGIT) -> LogitStats:
    """The LogitStats of the causal logits (q * scale) k^T, STATS_CHUNK query
    rows at a time against the keys up to the chunk's last row: forward only,
    never all L x L at once, and only the causal part's FLOPs (to a chunk)."""
    q, k = (jax.lax.stop_gradient(t).transpose(0, 2, 1, 3) for t in (q_BLHK, k_BLHK))
    q = q * scale
    length = q.shape[2]
    maxima, counts = [], []
    for start in range(0, length, STATS_CHUNK):
        stop = min(start + STATS_CHUNK, length)
        logits_BHCS = (q[:, :, start:stop] @ k[:, :, :stop].swapaxes(-1, -2)).astype(jnp.float32)
        rows, cols = jnp.arange(start, stop)[:, None], jnp.arange(stop)[None, :]
        logits_BHCS = jnp.where(cols <= rows, logits_BHCS, -jnp.inf)
        maxima.append(jnp.max(logits_BHCS, axis=(0, 2, 3)))
        # int32 per chunk, float32 across: a global batch's sum can pass int32's range
        counts.append(jnp.sum(logits_BHCS > large_logit, axis=(0, 2, 3), dtype=jnp.int32))
    n_large_H = sum(c.astype(jnp.float32) for c in counts)
    return LogitStats(functools.reduce(jnp.maximum, maxima), n_large_H)


def attention_with_stats(
    q, k, v, scale: float, kernel: str, large_logit: float, stats, attend: Attend = causal_attention
):
    """`attend`'s attention and the logits' LogitStats when `stats` is true (a
    bool, or a traced one: then the statistics pass runs only on the steps
    that ask for it, see muonjax.train.step); when not measured, the maxima and
    counts of no logits: -inf and 0."""
    out = attend(q, k, v, scale, kernel)
    n_heads = q.shape[2]
    unmeasured = lambda q, k: LogitStats(  # noqa: E731
        jnp.full((n_heads,), -jnp.inf, jnp.float32), jnp.zeros((n_heads,), jnp.float32)
    )
    measure = lambda q, k: logit_stats(q, k, scale, large_logit)  # noqa: E731
    if isinstance(stats, bool):
        return out, (measure if stats else unmeasured)(q, k)
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    return out, jax.lax.cond(stats, measure, unmeasured, q, k)


def kernel_for(config: ModelConfig) -> str:
    """config.attention_kernel, "auto" resolved for this process's first device
    (ModelConfig.kernels_for; a program on a mesh resolves it for the mesh's)."""
    return config.kernels_for(jax.devices()[0]).attention_kernel


class MHACache(NamedTuple):
    """One MHA layer's cache of S slots (the model stacks layers in front)."""

    k_BSHK: jax.Array  # (B, S, H, head_dim) config.dtype: keys after rope
    v_BSHK: jax.Array  # (B, S, H, head_dim) config.dtype: values


class MLACache(NamedTuple):
    """One MLA layer's cache of S slots (the model stacks layers in front):
    kv_lora_rank + qk_rope_head_dim values per slot, whatever the heads."""

    latent_BSR: jax.Array  # (B, S, kv_lora_rank) config.dtype: kv_a_norm of the latent
    k_rope_BSK: jax.Array  # (B, S, qk_rope_head_dim) config.dtype: the shared key after rope


def masked_softmax(logits_BHCS, mask_BCS):
    """softmax over the slots each query may see (mask_BCS True)."""
    # A finite floor, not -inf: a left-padding query sees no slot at all and
    # gets a harmless uniform average instead of NaN, which would reach the
    # real tokens through 0 * NaN once its cached values were read.
    floor = jnp.finfo(jnp.float32).min
    return jax.nn.softmax(jnp.where(mask_BCS[:, None], logits_BHCS, floor), axis=-1)


def _write(cache_BS, new_BC, slot):
    """cache_BS with new_BC written at slots [slot, slot + C) of axis 1."""
    return jax.lax.dynamic_update_slice_in_dim(cache_BS, new_BC.astype(cache_BS.dtype), slot, 1)


class MultiHeadAttention(nnx.Module):
    """Plain multi-head attention with rotary embeddings, for small presets."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        d_heads = c.n_heads * c.head_dim
        kw = dict(std=c.init_std, dtype=c.dtype, rngs=rngs)
        self.q_proj = Linear(c.d_model, d_heads, ("embed", "heads"), **kw)
        self.k_proj = Linear(c.d_model, d_heads, ("embed", "heads"), **kw)
        self.v_proj = Linear(c.d_model, d_heads, ("embed", "heads"), **kw)
        self.o_proj = Linear(d_heads, c.d_model, ("heads", "embed"), **kw)
        self.config = c
        self.attend = causal_attention  # static: muonjax.parallel may hand in its own

    def __call__(self, x_BLD, positions_BL, large_logit: float = LARGE_LOGIT, stats=True):
        c = self.config
        split = lambda t: t.reshape(*t.shape[:2], c.n_heads, c.head_dim)
        q = rope(split(self.q_proj(x_BLD)), positions_BL, c.rope_theta)
        k = rope(split(self.k_proj(x_BLD)), positions_BL, c.rope_theta)
        v = split(self.v_proj(x_BLD))
        kernel = kernel_for(c)
        out_BLHK, stats = attention_with_stats(
            q, k, v, c.head_dim**-0.5, kernel, large_logit, stats, self.attend
        )
        return self.o_proj(out_BLHK.reshape(*x_BLD.shape[:2], -1)), stats

    def decode(self, x_BCD, cache: MHACache, positions_BC, slot, mask_BCS):
        """The C new tokens' output, their keys and values written at `slot`:
        softmax(q k^T / sqrt(K) over the visible slots) v."""
        c = self.config
        split = lambda t: t.reshape(*t.shape[:2], c.n_heads, c.head_dim)
        q_BCHK = rope(split(self.q_proj(x_BCD)), positions_BC, c.rope_theta)
        k_BCHK = rope(split(self.k_proj(x_BCD)), positions_BC, c.rope_theta)
        cache = MHACache(
            _write(cache.k_BSHK, k_BCHK, slot),
            _write(cache.v_BSHK, split(self.v_proj(x_BCD)), slot),
        )
        q_BCHK = q_BCHK * c.head_dim**-0.5
        logits_BHCS = jnp.einsum("bchk,bshk->bhcs", q_BCHK, cache.k_BSHK).astype(jnp.float32)
        probs_BHCS = masked_softmax(logits_BHCS, mask_BCS).astype(cache.v_BSHK.dtype)
        out_BCHK = jnp.einsum("bhcs,bshk->bchk", probs_BHCS, cache.v_BSHK)
        return self.o_proj(out_BCHK.reshape(*x_BCD.shape[:2], -1)), cache

    @staticmethod
    def empty_cache(config: ModelConfig, shape: tuple[int, ...]) -> MHACache:
        """Zeros for `shape` = (..., B, S) slots."""
        zeros = jnp.zeros((*shape, config.n_heads, config.head_dim), config.dtype)
        return MHACache(zeros, zeros)

    @staticmethod
    def qk_clip_parts(config: ModelConfig) -> dict[str, tuple[int, tuple]]:
        """QK-Clip's slices: projection -> (features per head, (start, stop, power), ...):
        a head's query and key each times sqrt(gamma)."""
        half = (config.head_dim, ((0, config.head_dim, 0.5),))
        return {"q_proj": half, "k_proj": half}


class MultiHeadLatentAttention(nnx.Module):
    """MLA: keys and values come from a shared low-rank latent (kv_lora_rank)
    plus one rotary key shared by all heads (DeepSeek-V2 Sec. 2.1)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        kw = dict(std=c.init_std, dtype=c.dtype, rngs=rngs)
        q_out = c.n_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.d_model, q_out, ("embed", "heads"), **kw)
        else:
            self.q_a_proj = Linear(c.d_model, c.q_lora_rank, ("embed", "q_lora"), **kw)
            self.q_a_norm = RMSNorm(c.q_lora_rank, eps=c.latent_norm_eps, axis_name="q_lora")
            self.q_b_proj = Linear(c.q_lora_rank, q_out, ("q_lora", "heads"), **kw)
        self.kv_a_proj = Linear(
            c.d_model, c.kv_lora_rank + c.qk_rope_head_dim, ("embed", "kv"), **kw
        )
        self.kv_a_norm = RMSNorm(c.kv_lora_rank, eps=c.latent_norm_eps, axis_name="kv")
        self.kv_b_proj = Linear(
            c.kv_lora_rank, c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), ("kv", "heads"), **kw
        )
        self.o_proj = Linear(c.n_heads * c.v_head_dim, c.d_model, ("heads", "embed"), **kw)
        self.config = c
        self.attend = causal_attention  # static: muonjax.parallel may hand in its own

    def __call__(self, x_BLD, positions_BL, large_logit: float = LARGE_LOGIT, stats=True):
        c = self.config
        B, L, _ = x_BLD.shape
        if c.q_lora_rank is None:
            q = self.q_proj(x_BLD)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BLD)))
        q_nope, q_rope = jnp.split(
            q.reshape(B, L, c.n_heads, c.qk_head_dim), [c.qk_nope_head_dim], -1
        )
        latent, k_rope = jnp.split(self.kv_a_proj(x_BLD), [c.kv_lora_rank], -1)
        kv = self.kv_b_proj(self.kv_a_norm(latent)).reshape(B, L, c.n_heads, -1)
        k_nope, v = jnp.split(kv, [c.qk_nope_head_dim], -1)
        q_rope = rope(q_rope, positions_BL, c.rope_theta)
        k_rope = rope(k_rope[:, :, None, :], positions_BL, c.rope_theta)
        q = jnp.concatenate([q_nope, q_rope], -1)
        k = jnp.concatenate(
            [k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:3], c.qk_rope_head_dim))], -1
        )
        kernel = kernel_for(c)
        out_BLHV, stats = attention_with_stats(
            q, k, v, c.qk_head_dim**-0.5, kernel, large_logit, stats, self.attend
        )
        return self.o_proj(out_BLHV.reshape(B, L, -1)), stats

    def decode(self, x_BCD, cache: MLACache, positions_BC, slot, mask_BCS):
        """The C new tokens' output, their latents and rotary keys written at
        `slot`, with the absorbed projections (DeepSeek-V2 Sec. 2.1.2): with
        kv_b = [W_UK | W_UV] per head, logits = (q_nope W_UK^T . c + q_rope .
        k_rope) / sqrt(qk_head_dim), out = (probs . c) W_UV, c the cached latents."""
        c = self.config
        B, C, _ = x_BCD.shape
        H, N, R = c.n_heads, c.qk_nope_head_dim, c.kv_lora_rank
        if c.q_lora_rank is None:
            q = self.q_proj(x_BCD)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BCD)))
        q_nope_BCHN, q_rope_BCHK = jnp.split(q.reshape(B, C, H, c.qk_head_dim), [N], -1)
        q_rope_BCHK = rope(q_rope_BCHK, positions_BC, c.rope_theta)
        latent_BCR, k_rope_BCK = jnp.split(self.kv_a_proj(x_BCD), [R], -1)
        k_rope_BCK = rope(k_rope_BCK[:, :, None, :], positions_BC, c.rope_theta)[:, :, 0]
        cache = MLACache(
            _write(cache.latent_BSR, self.kv_a_norm(latent_BCR), slot),
            _write(cache.k_rope_BSK, k_rope_BCK, slot),
        )
        w_RHX = self.kv_b_proj.kernel[...].astype(c.dtype).reshape(R, H, N + c.v_head_dim)
        w_uk_RHN, w_uv_RHV = jnp.split(w_RHX, [N], -1)
        scale = c.qk_head_dim**-0.5
        q_latent_BCHR = jnp.einsum("bchn,rhn->bchr", q_nope_BCHN * scale, w_uk_RHN)
        logits_BHCS = jnp.einsum("bchr,bsr->bhcs", q_latent_BCHR, cache.latent_BSR) + jnp.einsum(
            "bchk,bsk->bhcs", q_rope_BCHK * scale, cache.k_rope_BSK
        )
        probs_BHCS = masked_softmax(logits_BHCS.astype(jnp.float32), mask_BCS)
        probs_BHCS = probs_BHCS.astype(cache.latent_BSR.dtype)
        out_BCHR = jnp.einsum("bhcs,bsr->bchr", probs_BHCS, cache.latent_BSR)
        out_BCHV = jnp.einsum("bchr,rhv->bchv", out_BCHR, w_uv_RHV)
        return self.o_proj(out_BCHV.reshape(B, C, -1)), cache

    @staticmethod
    def empty_cache(config: ModelConfig, shape: tuple[int, ...]) -> MLACache:
        """Zeros for `shape` = (..., B, S) slots."""
        return MLACache(
            jnp.zeros((*shape, config.kv_lora_rank), config.dtype),
            jnp.zeros((*shape, config.qk_rope_head_dim), config.dtype),
        )

    @staticmethod
    def qk_clip_parts(config: ModelConfig) -> dict[str, tuple[int, tuple]]:
        """QK-Clip's slices: projection -> (features per head, (start, stop, power), ...):
        q_nope and k_nope (kv_b's first features per head) times sqrt(gamma),
        q_rope times gamma; the shared rotary key (in kv_a) untouched."""
        c = config
        nope = c.qk_nope_head_dim
        query = (c.qk_head_dim, ((0, nope, 0.5), (nope, c.qk_head_dim, 1.0)))
        return {
            "q_proj" if c.q_lora_rank is None else "q_b_proj": query,
            "kv_b_proj": (nope + c.v_head_dim, ((0, nope, 0.5),)),
        }


ATTENTION = {"mla": MultiHeadLatentAttention, "mha": MultiHeadAttention}


def attention(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    return ATTENTION[config.attention](config, rngs=rngs)
