"""Splash attention (Pallas TPU), interpreted on this CPU, equals XLA's
attention: alone, in the whole model and in a sharded train step; and
compiled for a TPU from this CPU, it is the Mosaic kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from muonjax.models import Transformer, preset
from muonjax.models.attention import causal_attention
from muonjax.parallel import make_mesh, parse_mesh
from muonjax.parallel.attention import ShardedAttention
from muonjax.train import TrainConfig
from muonjax.train.program import build
from muonjax.train.step import loss_and_grads

# (query/key, value) head dims: MLA's in the tiny preset, MHA's
HEAD_DIMS = [(24, 16), (16, 16)]


def _qkv(L, K, V, B=2, H=4, seed=0):
    q, k, v = jax.random.normal(jax.random.key(seed), (3, B, L, H, max(K, V))) * 2
    return q[..., :K], k[..., :K], v[..., :V]


def _attention_and_grads(kernel, q, k, v):
    """causal_attention by `kernel` and the gradients of <out, a fixed cotangent>."""
    scale = q.shape[-1] ** -0.5
    attend = lambda q, k, v: causal_attention(q, k, v, scale, kernel)  # noqa: E731
    cotangent = jax.random.normal(jax.random.key(1), v.shape)
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(cotangent)


def _assert_splash_equals_xla(q, k, v):
    run = jax.jit(_attention_and_grads, static_argnums=0)
    out, grads = run("splash", q, k, v)
    want, want_grads = run("xla", q, k, v)
    assert out.shape == want.shape == v.shape
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    for name, grad, want_grad in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("K, V", HEAD_DIMS)
def test_splash_equals_xla_forward_and_gradients(K, V):
    """40 rows, padded to one block of 128: the padding is invisible."""
    _assert_splash_equals_xla(*_qkv(40, K, V))


@pytest.mark.slow
def test_splash_equals_xla_over_several_blocks():
    """300 rows padded to 384, three blocks of 128: whole, partial and skipped
    blocks of the causal mask."""
    _assert_splash_equals_xla(*_qkv(300, 24, 16, B=1, H=2))


def _model_loss_and_grads(config, tokens):
    """The model's cross-entropy, aux outputs and gradients on `tokens` (B, L + 1)."""
    graphdef, params, rest = nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
    return jax.jit(loss_and_grads, static_argnums=0)(graphdef, params, rest, tokens)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_model_with_splash_equals_xla(attention):
    config = preset("tiny").replace(attention=attention, n_layers=1, first_k_dense=1)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 25)).astype(np.int32)
    loss, aux, grads = _model_loss_and_grads(config.replace(attention_kernel="splash"), tokens)
    want, want_aux, want_grads = _model_loss_and_grads(
        config.replace(attention_kernel="xla"), tokens
    )
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(aux.max_logit_LH, want_aux.max_logit_LH, rtol=1e-6)
    named = jax.tree_util.tree_leaves_with_path(grads)
    for (path, grad), want_grad in zip(named, jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6, err_msg=str(path))


def _step_and_eval(kernel: str, mesh_text: str):
    """One train step's loss and gradient norm, the loss of the new parameters, and them."""
    config = TrainConfig(optimizer="muon", batch_size=8, seq_len=16, warmup_steps=0, mesh=mesh_text)
    model_config = preset("tiny").replace(attention_kernel=kernel)
    program = build(config, model_config, make_mesh(parse_mesh(mesh_text)))
    tokens = np.random.default_rng(0).integers(0, 256, (8, 17)).astype(np.int32)
    batch = jax.device_put(tokens, program.batch)
    state, metrics = program.step(program.init(), batch)
    losses = [
        float(metrics["loss"]),
        float(metrics["grad_norm"]),
        float(np.divide(*program.eval(state, batch))),
    ]
    return losses, jax.device_get(state.params)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_text",
    # each device's rows in the step's shard_map; heads over tensor, the compiler's step
    ["data=4,expert=2", "data=2,expert=2,tensor=2"],
)
def test_train_step_and_eval_with_splash_equal_xla(mesh_text):
    losses, params = _step_and_eval("splash", mesh_text)
    want_losses, want_params = _step_and_eval("xla", mesh_text)
    np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
    # AdamW's first step moves a weight by about learning_rate * sign(gradient)
    # (1e-2): a weight whose gradient is about 0 moves by rounding's worth of it
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


def _tpu_devices():
    pytest.importorskip("libtpu")
    from muonjax.parallel.tpu import parse_slice, slice_devices

    return slice_devices(parse_slice("v5p-8"))  # 4 chips


def _tpu_attention_text(attend, mesh, spec, K=192, V=128, L=256, B=2, H=4) -> str:
    """The optimized HLO of `attend`'s forward and backward pass (MLA's real
    head dims, bfloat16) compiled for `mesh`'s TPU devices, inputs split by `spec`."""

    def forward_backward(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, K**-0.5, "splash"), q, k, v)
        return out, vjp(out)

    shapes = [jax.ShapeDtypeStruct((B, L, H, d), jnp.bfloat16) for d in (K, K, V)]
    sharding = NamedSharding(mesh, spec)
    jitted = jax.jit(forward_backward, in_shardings=(sharding,) * 3)
    return jitted.lower(*shapes).compile().as_text()


def test_splash_compiles_to_the_mosaic_kernel_for_a_tpu():
    """Compiled for a TPU from this CPU, the forward, dq and dkv kernels are Mosaic's."""
    mesh = jax.sharding.Mesh(np.asarray(_tpu_devices()[:1]), ("x",))
    text = _tpu_attention_text(causal_attention, mesh, P())
    assert text.count("tpu_custom_call") >= 3


def test_sharded_splash_compiles_for_a_tpu_mesh():
    """On a mesh of 4 TPU chips the compiler cannot partition the kernel:
    ShardedAttention runs it per device, rows over data and heads over tensor."""
    mesh = make_mesh(parse_mesh("data=2,tensor=2"), _tpu_devices())
    text = _tpu_attention_text(ShardedAttention(mesh), mesh, P("data", None, "tensor"))
    assert "tpu_custom_call" in text


def _splash_kernels(hlo_text: str) -> int:
    return sum("tpu_custom_call" in line and "splash" in line for line in hlo_text.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("mesh_text", ["data=4", "data=2,tensor=2"])
def test_train_step_and_eval_with_splash_compile_for_a_tpu_mesh(mesh_text):
    """The program's step (per device in its shard_map, or the compiler's with a
    tensor axis) and its eval (outside any shard_map) compile for 4 TPU chips,
    each layer's forward, dq and dkv kernels Mosaic's."""
    config = TrainConfig(optimizer="muon", batch_size=8, seq_len=128, mesh=mesh_text)
    # the experts by ragged_dot (XLA's own TPU kernels, not counted)
    model_config = preset("tiny").replace(attention_kernel="splash", moe_dispatch="ragged_dot")
    program = build(config, model_config, make_mesh(parse_mesh(mesh_text), _tpu_devices()))
    tokens = jax.ShapeDtypeStruct((8, 129), jnp.int32, sharding=program.batch)
    compiled = [f.lower(program.abstract(), tokens).compile() for f in (program.step, program.eval)]
    step_kernels, eval_kernels = (_splash_kernels(c.as_text()) for c in compiled)
    assert (step_kernels, eval_kernels) == (3 * model_config.n_layers, model_config.n_layers)
