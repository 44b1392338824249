"""Gradient accumulation and the loss mask: K micro-batches of B/K make the same
update as one batch of B (on one device and data-parallel), input-only tokens
are no loss targets, and micro-batching lowers the step's peak memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import muonjax.train.step as step_module
from muonjax.models import Transformer, preset
from muonjax.models.transformer import matmul_weights_in
from muonjax.optim.paths import path_names
from muonjax.parallel import MeshError, make_mesh, parse_mesh, run_mesh
from muonjax.train import TrainConfig
from muonjax.train.program import build
from muonjax.train.step import init_state, loss_and_grads, split_targets

TINY = preset("tiny")
# tiny cut to one MoE layer: the balance loss and the routing stay, half the compile time
MOE = TINY.replace(n_layers=1, first_k_dense=0)
BATCH, SEQ = 16, 16


def _batches(n=3, seed=0):
    """Byte tokens whose rows start with prompts (stored negative) of different
    lengths, so rows, micro-batches and devices hold different numbers of
    targets: a mean of per-part means would not be the global mean."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, 256, (BATCH, SEQ + 1))
        prompt = rng.integers(0, SEQ, BATCH)
        prompt[0] = SEQ + 1  # a row without targets
        masked = np.arange(SEQ + 1)[None, :] < prompt[:, None]
        out.append(np.where(masked, -(ids + 1), ids).astype(np.int32))
    return out


@functools.cache
def _run(optimizer, mesh_text, grad_accum):
    """Losses, parameters before and after each step of 3 steps."""
    config = TrainConfig(
        optimizer=optimizer,
        batch_size=BATCH,
        seq_len=SEQ,
        warmup_steps=0,
        learning_rate=1e-3,
        mesh=mesh_text,
        grad_accum=grad_accum,
    )
    if mesh_text == "data=1":
        mesh = make_mesh(parse_mesh(mesh_text), devices=jax.devices()[:1])
    else:
        mesh = make_mesh(parse_mesh(mesh_text))
    program = build(config, MOE, mesh)
    state = program.init()
    losses, params = [], [jax.device_get(state.params)]
    for tokens in _batches():
        state, metrics = program.step(state, jax.device_put(tokens, program.batch))
        losses.append(float(metrics["loss"]))
        params.append(jax.device_get(state.params))
    return losses, params


def _assert_same_run(run, ref, label):
    """Equal losses; parameters and each step's update equal to 2% of the
    learning rate. Not tighter: AdamW sends g / (|g| + 1e-8), and the few
    gradient entries that happen to be near 1e-8 turn float32 rounding of
    their sums into ~1% of an update (a wrong normalization of micro-batches
    or of the balance loss moves updates by 25-150%)."""
    losses, params = run
    ref_losses, ref_params = ref
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=label)
    for a, b in zip(jax.tree.leaves(params[-1]), jax.tree.leaves(ref_params[-1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=label)
    for step in range(1, len(params)):
        delta = lambda p, step=step: [
            np.asarray(x, np.float64) - np.asarray(y, np.float64)
            for x, y in zip(jax.tree.leaves(p[step]), jax.tree.leaves(p[step - 1]))
        ]
        new, old = delta(params), delta(ref_params)
        scale = max(np.abs(u).max() for u in old)
        diff = max(np.abs(u - v).max() for u, v in zip(new, old))
        assert diff <= 2e-2 * scale, (label, step, diff, scale)


@pytest.mark.slow
def test_micro_batches_make_the_update_of_the_whole_batch_on_one_device_and_eight():
    # the gradient is summed before the optimizer sees it: one optimizer is enough
    ref = _run("muon", "data=1", 1)
    _assert_same_run(_run("muon", "data=1", 4), ref, "data=1, K=4")
    _assert_same_run(_run("muon", "data=8", 1), ref, "data=8, K=1")
    _assert_same_run(_run("muon", "data=8", 2), ref, "data=8, K=2")


def test_rows_per_device_must_divide_into_micro_batches():
    with pytest.raises(
        MeshError,
        match=r"--batch-size 16 gives 2 rows per device over the data-parallel size 8 "
        r"\(data x expert\), which --grad-accum 4 does not divide: use a multiple of 32",
    ):
        run_mesh("data=8", 16, 4)


def test_split_targets_decodes_input_only_tokens():
    tokens = jnp.array([[5, -8, -1, 3, 0, -3]], jnp.int32)
    inputs, targets, weights = split_targets(tokens)
    np.testing.assert_array_equal(inputs, [[5, 7, 0, 3, 0]])
    np.testing.assert_array_equal(targets, [[7, 0, 3, 0, 2]])
    np.testing.assert_array_equal(weights, [[0, 0, 1, 1, 0]])


def test_masked_positions_are_no_loss_targets():
    graphdef, state = init_state(MOE, optax.sgd(0.1), seed=0)
    params, rest = state.params, state.rest
    grads_of = jax.jit(functools.partial(loss_and_grads, graphdef))
    loss_of = lambda p, r, tokens: grads_of(p, r, tokens)[:2]
    logits_of = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x)[0])
    encode = lambda ids, masked: np.where(masked, -(ids + 1), ids).astype(np.int32)

    ids = np.random.default_rng(1).integers(0, 256, (4, SEQ + 1))
    masked = np.zeros(ids.shape, bool)
    masked[:, 5:9] = True  # a prompt span inside the rows
    masked[1, -1] = True  # the last position is only ever a target, never an input
    ids[1, -1] = 17
    tokens = encode(ids, masked)
    other = tokens.copy()
    other[1, -1] = -(200 + 1)  # another id there, still masked
    unmasked = tokens.copy()
    unmasked[1, -1] = 200  # that id as a target

    ce, _, grads = grads_of(params, rest, tokens)
    ce_other, _, grads_other = grads_of(params, rest, other)
    ce_unmasked, _, grads_unmasked = grads_of(params, rest, unmasked)
    assert float(ce) == float(ce_other)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_other)):
        np.testing.assert_array_equal(a, b)
    assert float(ce) != float(ce_unmasked)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_unmasked))
    )

    # the masked mean, from the logits of the ids, in float64
    def nll(ids):
        logits = np.asarray(logits_of(params, rest, jnp.asarray(ids[:, :-1], jnp.int32)))
        logits = logits.astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        return -np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]

    weights = ~masked[:, 1:]
    expected = (nll(ids) * weights).sum() / weights.sum()
    np.testing.assert_allclose(float(ce), expected, rtol=1e-5)
    # plain text: the mean cross-entropy over all positions
    plain = float(loss_of(params, rest, ids.astype(np.int32))[0])
    np.testing.assert_allclose(plain, nll(ids).mean(), rtol=1e-5)
    # no targets at all: 0, not nan
    assert float(loss_of(params, rest, encode(ids, np.ones(ids.shape, bool)))[0]) == 0.0


def _peak_bytes(grad_accum, batch=64, seq_len=128):
    config = TrainConfig(batch_size=batch, seq_len=seq_len, grad_accum=grad_accum)
    mesh = make_mesh(parse_mesh("data=1"), devices=jax.devices()[:1])
    program = build(config, MOE, mesh)
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32, sharding=program.batch)
    memory = program.step.lower(program.abstract(), tokens).compile().memory_analysis()
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )


@pytest.mark.slow
def test_micro_batches_lower_peak_memory():
    whole, micro = _peak_bytes(1), _peak_bytes(4)
    assert micro < 0.5 * whole, (micro, whole)


def _split(config):
    return nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param, ...)


@pytest.mark.parametrize("k", [1, 2])
def test_matmul_weights_cast_once_give_the_same_loss_and_gradients(monkeypatch, k):
    """The step casts the matmul weights to bfloat16 once, before the
    micro-batches: bit for bit what casting them at each use gives."""
    graphdef, params, rest = _split(TINY.replace(dtype="bfloat16"))
    tokens = jnp.asarray(_batches(1)[0])

    def run():  # a new function each time: jit's cache would reuse the first trace
        grads = lambda p, r, t: step_module.accumulated_grads(  # noqa: E731
            graphdef, p, r, t, k=k, n_targets=step_module.count_targets(t),
            balance_weight=1.0 / k, large_logit=100.0, stats=True,
        )  # fmt: skip
        return jax.jit(grads)(params, rest, tokens)

    once = run()
    monkeypatch.setattr(step_module, "matmul_weights_in", lambda params, dtype: params)
    each_use = run()
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(each_use), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_only_the_weights_cast_at_each_use_are_cast():
    _, params, _ = _split(TINY)
    cast = matmul_weights_in(params, "bfloat16")
    dtypes = {
        "/".join(path_names(path)): leaf.dtype
        for path, leaf in jax.tree_util.tree_leaves_with_path(cast)
    }
    float32 = {name for name, dtype in dtypes.items() if dtype == jnp.float32}
    assert float32 == {
        name for name in dtypes
        if name.endswith(("scale", "router/kernel", "embedding"))
    }  # fmt: skip
    assert {"lm_head/kernel", "moe_layers/moe/experts/gate"} <= set(dtypes) - float32
