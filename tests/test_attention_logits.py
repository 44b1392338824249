"""Attention-logit statistics (paper App. D; the input of QK-Clip): the
per-layer, per-head max logit after the softmax scale and the count of logits
above a threshold equal a float64 NumPy recomputation over the valid (causal)
logits, for MHA and MLA, in the model and in the trainer's metrics on 1 and 8
devices and with gradient accumulation; array metrics reach metrics.jsonl."""

import functools
import math

import jax
import numpy as np
import pytest
from flax import nnx

from muonjax.models import Transformer, preset
from muonjax.parallel import make_mesh, parse_mesh
from muonjax.train import TrainConfig, config_from_args, read_metrics
from muonjax.train.errors import ConfigError
from muonjax.train.metrics import MetricsWriter
from muonjax.train.program import build

# init_std 0.2 spreads the logits over a few units (0.02 keeps them near 0)
CONFIGS = {
    "mha": preset("tiny").replace(attention="mha", head_dim=16, init_std=0.2),
    "mla": preset("tiny").replace(init_std=0.2),
}
BATCH, SEQ = 16, 16


def _rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * scale


def _rope(x_BLHK, theta):
    half = x_BLHK.shape[-1] // 2
    angles = np.arange(x_BLHK.shape[1])[None, :, None, None] * theta ** (-np.arange(half) / half)
    x1, x2 = x_BLHK[..., :half], x_BLHK[..., half:]
    return np.concatenate(
        [x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1
    )


def _np(variable):
    return np.asarray(variable[...], np.float64)


def _valid_logits(config, block, x_BLD):
    """(B, H, L(L+1)/2) float64: one block's causal logits q k^T * scale, from
    its parameters and its input."""
    B, L, _ = x_BLD.shape
    a, c = block.attn, config
    h = _rms_norm(np.asarray(x_BLD, np.float64), _np(block.attn_norm.scale), c.rms_norm_eps)
    if c.attention == "mha":
        q = _rope((h @ _np(a.q_proj.kernel)).reshape(B, L, c.n_heads, -1), c.rope_theta)
        k = _rope((h @ _np(a.k_proj.kernel)).reshape(B, L, c.n_heads, -1), c.rope_theta)
    else:
        if c.q_lora_rank is None:
            q = h @ _np(a.q_proj.kernel)
        else:
            q_latent = _rms_norm(
                h @ _np(a.q_a_proj.kernel), _np(a.q_a_norm.scale), c.latent_norm_eps
            )
            q = q_latent @ _np(a.q_b_proj.kernel)
        q_nope, q_rope = np.split(q.reshape(B, L, c.n_heads, -1), [c.qk_nope_head_dim], -1)
        latent, k_rope = np.split(h @ _np(a.kv_a_proj.kernel), [c.kv_lora_rank], -1)
        latent = _rms_norm(latent, _np(a.kv_a_norm.scale), c.latent_norm_eps)
        k_nope = (latent @ _np(a.kv_b_proj.kernel)).reshape(B, L, c.n_heads, -1)
        k_nope = k_nope[..., : c.qk_nope_head_dim]
        k_rope = _rope(k_rope[:, :, None, :], c.rope_theta)
        q = np.concatenate([q_nope, _rope(q_rope, c.rope_theta)], -1)
        k = np.concatenate(
            [k_nope, np.broadcast_to(k_rope, (*k_nope.shape[:3], k_rope.shape[-1]))], -1
        )
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(c.qk_head_dim)
    rows, cols = np.tril_indices(L)
    return logits[:, :, rows, cols]


def _reference_logits(config, model, tokens_BL):
    """(layers, B, H, L(L+1)/2) float64: every layer's valid logits, each layer
    fed the model's own (float32) residual stream."""
    x_BLD = model.embed(tokens_BL)
    positions_BL = np.broadcast_to(np.arange(tokens_BL.shape[1]), tokens_BL.shape)
    out = []
    for stack in (model.dense_layers, model.moe_layers):
        if stack is None:
            continue
        graphdef, state = nnx.split(stack)
        for i in range(jax.tree.leaves(state)[0].shape[0]):
            block = nnx.merge(graphdef, jax.tree.map(lambda s, i=i: s[i], state))
            out.append(_valid_logits(config, block, x_BLD))
            x_BLD, _ = block(x_BLD, positions_BL)
    return np.stack(out)


def _threshold_in_gap(logits):
    """A threshold inside the logits' range (near their 90th percentile), in the
    middle of the widest gap there, so that float32 rounding cannot move a logit
    across it."""
    values = np.sort(logits.ravel())
    lo, hi = int(0.85 * values.size), int(0.95 * values.size)
    gaps = np.diff(values[lo:hi])
    i = lo + int(np.argmax(gaps))
    assert gaps.max() > 1e-4 * abs(values[i])
    return float((values[i] + values[i + 1]) / 2)


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (BATCH, SEQ + 1)).astype(np.int32)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_model_logit_stats_match_numpy(kind):
    config = CONFIGS[kind]
    model = Transformer(config, rngs=nnx.Rngs(3))
    tokens_BL = _tokens()[:4, :-1]
    ref_LBHN = _reference_logits(config, model, tokens_BL)
    threshold = _threshold_in_gap(ref_LBHN)
    _, aux = model(tokens_BL, threshold)
    assert aux.max_logit_LH.shape == aux.n_large_logits_LH.shape == (2, config.n_heads)
    np.testing.assert_allclose(aux.max_logit_LH, ref_LBHN.max(axis=(1, 3)), rtol=1e-5)
    np.testing.assert_array_equal(aux.n_large_logits_LH, (ref_LBHN > threshold).sum(axis=(1, 3)))
    assert 0 < aux.n_large_logits_LH.sum() < ref_LBHN.size


@functools.cache
def _reference(kind):
    """The first train batch, the trainer's initial model's valid logits on it,
    and a threshold inside their range."""
    tokens = _tokens(seed=1)
    # init_state builds the model from the config's seed (0)
    model = Transformer(CONFIGS[kind], rngs=nnx.Rngs(0))
    ref_LBHN = _reference_logits(CONFIGS[kind], model, tokens[:, :-1])
    return tokens, ref_LBHN, _threshold_in_gap(ref_LBHN)


@pytest.mark.parametrize(
    "kind, mesh_text, grad_accum",
    [
        ("mla", "data=2,expert=2,tensor=2", 2),
        ("mha", "data=8", 2),
    ],
)
@pytest.mark.slow
def test_step_metrics_are_global_over_devices_and_micro_batches(kind, mesh_text, grad_accum):
    """The first step's metrics come from the initial parameters' forward pass
    over the whole batch: NumPy's on 1 device, on data=8 (pmax and psum of
    counts over devices), across data, expert and tensor axes, and with the
    counts summed over grad_accum micro-batches."""
    tokens, ref_LBHN, threshold = _reference(kind)
    config = TrainConfig(
        optimizer="adamw",
        batch_size=BATCH,
        seq_len=SEQ,
        seed=0,
        grad_accum=grad_accum,
        mesh=mesh_text,
        large_logit_threshold=threshold,
        log_every=1,  # the statistics are measured on logged steps
    )
    devices = jax.devices()[:1] if mesh_text == "data=1" else None
    program = build(config, CONFIGS[kind], make_mesh(parse_mesh(mesh_text), devices=devices))
    _, metrics = program.step(program.init(), jax.device_put(tokens, program.batch))
    m = jax.device_get(metrics)

    valid = BATCH * CONFIGS[kind].n_heads * SEQ * (SEQ + 1) / 2  # causal logits per layer
    assert ref_LBHN[0].size == valid
    n_large_L = (ref_LBHN > threshold).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(
        m["max_attention_logit_per_layer"], ref_LBHN.max(axis=(1, 2, 3)), rtol=1e-5
    )
    assert m["max_attention_logit"] == m["max_attention_logit_per_layer"].max()
    np.testing.assert_allclose(
        m["large_attention_logit_ratio_per_layer"], n_large_L / valid, rtol=1e-6
    )
    np.testing.assert_allclose(
        m["large_attention_logit_ratio"], n_large_L.sum() / (len(n_large_L) * valid), rtol=1e-6
    )


def test_metrics_writer_writes_arrays_as_lists(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(3, {"loss": np.float32(2.5), "per_layer": np.asarray([1.0, 2.0], np.float32)})
    writer.close()
    assert read_metrics(tmp_path) == [{"step": 3, "loss": 2.5, "per_layer": [1.0, 2.0]}]


def test_threshold_flag():
    assert config_from_args(["--large-logit-threshold", "5"]).large_logit_threshold == 5.0
    assert TrainConfig().large_logit_threshold == 100.0
    with pytest.raises(ConfigError, match="--large-logit-threshold"):
        TrainConfig(large_logit_threshold=math.inf)
