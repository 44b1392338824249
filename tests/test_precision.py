"""--dtype bfloat16: activations and matmuls in bf16, parameters and optimizer
state in float32, and a loss close to float32's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muonjax.parallel.mesh import make_mesh, parse_mesh
from muonjax.train import TrainConfig
from muonjax.train.corpus import load_corpus
from muonjax.train.program import build

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow


def _train(dtype, batches):
    # tiny cut to its MoE layer (attention, routing, experts): half the compile time
    moe = {"n_layers": 1, "first_k_dense": 0}
    config = TrainConfig(
        dtype=dtype, batch_size=8, seq_len=64, warmup_steps=5, steps=len(batches), model=moe
    )
    mesh = make_mesh(parse_mesh("data=1"), devices=jax.devices()[:1])
    program = build(config, config.model_config(vocab_size=256), mesh)
    state = program.init()
    losses = []
    for tokens in batches:
        state, metrics = program.step(state, jax.device_put(tokens, program.batch))
        losses.append(float(metrics["loss"]))
    return losses, state


def test_bfloat16_trains_within_a_few_percent_of_float32():
    text = "".join(load_corpus().texts[:40]).encode()
    tokens = np.frombuffer(text, np.uint8).astype(np.int32)
    windows = tokens[: len(tokens) // 65 * 65].reshape(-1, 65)
    rng = np.random.default_rng(0)
    batches = [windows[rng.choice(len(windows), 8, replace=False)] for _ in range(40)]
    f32, f32_state = _train("float32", batches)
    bf16, bf16_state = _train("bfloat16", batches)
    assert f32 != bf16  # bf16 really ran
    assert np.mean(f32[-10:]) < 0.8 * f32[0]  # both learn
    assert abs(np.mean(bf16[-10:]) / np.mean(f32[-10:]) - 1) < 0.03
    for leaf in jax.tree.leaves((bf16_state.params, bf16_state.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
