"""Building blocks: parameters with logical axis names, RMSNorm, RoPE, SwiGLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float):
    """A float32 normal(0, std) parameter whose axes carry logical names.

    The names (e.g. ("embed", "mlp")) are mapped onto mesh axes by
    muonjax.parallel; nothing is sharded at creation.
    """
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Linear(nnx.Module):
    """x @ kernel, kernel stored (in, out) so Muon reads it as one matrix."""

    def __init__(self, d_in: int, d_out: int, axes, *, std: float, dtype: str, rngs: nnx.Rngs):
        self.kernel = param(rngs, (d_in, d_out), axes, std)
        self.dtype = dtype

    def __call__(self, x):
        return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32."""

    def __init__(self, dim: int, *, eps: float, axis_name: str | None = "embed"):
        self.scale = nnx.Param(
            jnp.ones((dim,), jnp.float32), out_sharding=(axis_name,), eager_sharding=False
        )
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...]).astype(x.dtype)


def rope(x_BLHK, positions_BL, theta: float):
    """Rotary position embedding on the last axis (rotate-half layout)."""
    half = x_BLHK.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions_BL[:, :, None, None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHK.dtype)


class MLP(nnx.Module):
    """SwiGLU: (silu(x W_gate) * (x W_up)) W_down."""

    def __init__(self, d_model: int, hidden: int, *, std: float, dtype: str, rngs: nnx.Rngs):
        self.gate = Linear(d_model, hidden, ("embed", "mlp"), std=std, dtype=dtype, rngs=rngs)
        self.up = Linear(d_model, hidden, ("embed", "mlp"), std=std, dtype=dtype, rngs=rngs)
        self.down = Linear(hidden, d_model, ("mlp", "embed"), std=std, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
