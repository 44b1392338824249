"""Attention through jax.nn.dot_product_attention, and the logit statistics'
pass of its own: equal on CPU to the path they replaced (written out here as
it was: logits materialized, the full square masked), and the statistics
measured exactly on the steps that need them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muonjax.models import attention, preset
from muonjax.models.attention import causal_attention, kernel_for, logit_stats
from muonjax.parallel import make_mesh, parse_mesh
from muonjax.train import TrainConfig
from muonjax.train.program import build


def _materialized(q_BLHK, k_BLHK, v_BLHV, scale, large_logit):
    """The replaced path: (B, H, L, L) float32 logits, the square masked."""
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q_BLHK, k_BLHK, v_BLHV))
    logits = ((q * scale) @ k.swapaxes(-1, -2)).astype(jnp.float32)
    length = q.shape[2]
    logits = logits + jnp.where(jnp.tril(jnp.ones((length, length), bool)), 0.0, -jnp.inf)
    n_large = jnp.sum(logits > large_logit, axis=(0, 2, 3), dtype=jnp.int32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return (probs @ v).transpose(0, 2, 1, 3), jnp.max(logits, axis=(0, 2, 3)), n_large


def _qkv(dtype, L=40, K=24, V=16, seed=0):
    q, k, v = jax.random.normal(jax.random.key(seed), (3, 2, L, 4, max(K, V)), jnp.float32) * 2
    return q[..., :K].astype(dtype), k[..., :K].astype(dtype), v[..., :V].astype(dtype)


def _float64(q_BLHK, k_BLHK, v_BLHV, scale):
    q, k, v = (np.asarray(t, np.float64).transpose(0, 2, 1, 3) for t in (q_BLHK, k_BLHK, v_BLHV))
    logits = q @ k.swapaxes(-1, -2) * scale
    logits[..., ~np.tril(np.ones(logits.shape[-2:], bool))] = -np.inf
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3)


CASES = [(24, 16), (16, 16), (8, 16)]  # (query/key, value) head dims: MLA's, MHA's, wider values


@pytest.mark.parametrize("K, V", CASES)
def test_attention_equals_the_materialized_path_in_float32(K, V):
    q, k, v = _qkv(jnp.float32, K=K, V=V)
    out = jax.jit(causal_attention, static_argnums=(3, 4))(q, k, v, K**-0.5, "xla")
    want, _, _ = _materialized(q, k, v, K**-0.5, 0.0)
    assert out.shape == want.shape == (2, 40, 4, V) and out.dtype == jnp.float32
    # the scale applied after the product instead of before moves a logit of
    # ~30 by an ulp (2e-6), and its weight by as much relatively
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("K, V", CASES)
def test_attention_in_bfloat16_is_no_less_exact_than_the_materialized_path(K, V):
    """The replaced path rounded q * scale and the logits to bfloat16 (an ulp of
    a logit of 30 is 0.125); dot_product_attention keeps the logits float32."""
    q, k, v = _qkv(jnp.bfloat16, K=K, V=V)
    exact = _float64(q, k, v, K**-0.5)
    out = jax.jit(causal_attention, static_argnums=(3, 4))(q, k, v, K**-0.5, "xla")
    old, _, _ = _materialized(q, k, v, K**-0.5, 0.0)
    assert out.dtype == jnp.bfloat16
    error, old_error = (np.abs(np.float64(t) - exact).max() for t in (out, old))
    assert error <= old_error
    # the probabilities and the output each rounded once to bfloat16 (2^-8)
    assert error <= 2**-6 * np.abs(exact).max()


@pytest.mark.parametrize("chunk", [7, 16, 512])  # uneven chunks, even ones, one chunk
def test_logit_stats_equal_the_materialized_ones(monkeypatch, chunk):
    monkeypatch.setattr(attention, "STATS_CHUNK", chunk)
    q, k, v = _qkv(jnp.float32)
    _, want_max, want_count = _materialized(q, k, v, 0.3, 1.5)
    stats = logit_stats(q, k, 0.3, 1.5)
    np.testing.assert_array_equal(stats.max_logit, want_max)
    np.testing.assert_array_equal(stats.n_large, np.float32(want_count))
    assert 0 < want_count.sum() < 2 * 4 * 40 * 41 // 2


def test_auto_kernel_is_xla_off_gpu_and_named_kernels_are_kept():
    config = preset("tiny")
    assert kernel_for(config) == "xla"  # this CPU
    assert kernel_for(config.replace(attention_kernel="cudnn")) == "cudnn"


class _Device:
    def __init__(self, platform, compute_capability=None):
        self.platform = platform
        if compute_capability is not None:
            self.compute_capability = compute_capability


@pytest.mark.parametrize(
    "device, changes, attention, experts",
    [
        (_Device("cpu"), {}, "xla", "blocks"),
        (_Device("tpu"), {}, "splash", "megablox"),
        (_Device("gpu", "9.0"), {"dtype": "bfloat16"}, "cudnn", "ragged_dot"),
        (_Device("gpu", "9.0"), {}, "xla", "ragged_dot"),  # float32: cuDNN's kernel is bf16
        # MLA's 192 query/key dims: Hopper's cuDNN takes up to 256, Ampere's 128
        (_Device("gpu", "8.0"), {"dtype": "bfloat16", "qk_nope_head_dim": 128,
                                 "qk_rope_head_dim": 64}, "xla", "ragged_dot"),
        (_Device("gpu", "9.0"), {"dtype": "bfloat16", "qk_nope_head_dim": 128,
                                 "qk_rope_head_dim": 64}, "cudnn", "ragged_dot"),
        (_Device("gpu", "9.0"), {"dtype": "bfloat16", "attention": "mha", "head_dim": 20},
         "xla", "ragged_dot"),  # not a multiple of 8
    ],
)  # fmt: skip
def test_auto_kernels_follow_the_programs_device(device, changes, attention, experts):
    """A program resolves "auto" for its mesh's devices, which are TPU chips
    when compiled for a slice from this CPU host; named kernels are kept."""
    config = preset("tiny").replace(**changes)
    resolved = config.kernels_for(device)
    assert (resolved.attention_kernel, resolved.moe_dispatch) == (attention, experts)
    named = config.replace(attention_kernel="xla", moe_dispatch="tiles").kernels_for(device)
    assert (named.attention_kernel, named.moe_dispatch) == ("xla", "tiles")


def _first_steps(**changes):
    config = TrainConfig(optimizer="muon", batch_size=4, seq_len=16, steps=5, **changes)
    program = build(config, preset("tiny"), make_mesh(parse_mesh("data=1"), jax.devices()[:1]))
    state = program.init()
    tokens = np.random.default_rng(0).integers(0, 256, (4, 17)).astype(np.int32)
    found = []
    for _ in range(3):
        state, metrics = program.step(state, jax.device_put(tokens, program.batch))
        found.append((float(metrics["max_attention_logit"]), float(metrics["update_rms_muon"])))
    return found


def test_metrics_only_passes_run_on_logged_steps_and_logits_on_every_qk_clip_step():
    """The logit statistics and the update / weight RMS are taken on logged
    steps only (the others' metrics are never written); QK-Clip needs the
    max logits every step."""
    unlogged, logged, _ = _first_steps(log_every=2)
    assert unlogged[0] == -np.inf and np.isnan(unlogged[1])
    assert np.isfinite(logged).all()
    assert all(np.isfinite(logit) for logit, _ in _first_steps(log_every=2, qk_clip=1000.0))
