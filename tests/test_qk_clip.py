"""QK-Clip (MuonClip): the rule equals a float64 NumPy reference written from
its definition, bounds the recomputed logits of every clipped head at tau (MHA,
MLA, MLA with a query LoRA; scanned dense and MoE stacks), leaves the other
heads bit-identical, works as an optax transformation and in the trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_attention_logits import _valid_logits

import muonjax
from muonjax.models import Transformer, preset, qk_clip_heads
from muonjax.models.attention import ATTENTION
from muonjax.parallel import make_mesh, parse_mesh
from muonjax.train import TrainConfig, config_from_args
from muonjax.train.errors import ConfigError
from muonjax.train.program import build

# init_std 0.2 spreads the heads' max logits over a few units; tiny = one dense + one MoE layer
CONFIGS = {
    "mha": preset("tiny").replace(attention="mha", head_dim=16, init_std=0.2),
    "mla": preset("tiny").replace(init_std=0.2),
    "mla_q_lora": preset("tiny").replace(q_lora_rank=24, init_std=0.2),
}


def _tokens(batch=4, length=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, length)).astype(np.int32)


def _blocks(model):
    """The model's blocks, one per layer in max_logit_LH's row order."""
    blocks = []
    for stack in (model.dense_layers, model.moe_layers):
        graphdef, state = nnx.split(stack)
        for i in range(jax.tree.leaves(state)[0].shape[0]):
            blocks.append(nnx.merge(graphdef, jax.tree.map(lambda s, i=i: s[i], state)))
    return blocks


def _layer_logits(config, model, tokens_BL):
    """(layers, B, H, N) float64: each layer's valid logits on the residual
    stream of `model`, and that stream (each layer's input)."""
    x_BLD = model.embed(tokens_BL)
    positions_BL = np.broadcast_to(np.arange(tokens_BL.shape[1]), tokens_BL.shape)
    logits, inputs = [], []
    for block in _blocks(model):
        inputs.append(x_BLD)
        logits.append(_valid_logits(config, block, x_BLD))
        x_BLD, _ = block(x_BLD, positions_BL)
    return np.stack(logits), inputs


def _reference_clip(config, params: dict, max_logit_LH, tau) -> dict:
    """The rule from its definition, in float64, one layer and head at a time.

    params: {stack: {projection: kernel (layers, in, out)}}, NumPy. For each
    head h of layer l with S > tau, gamma = tau / S: MHA's q and k head
    columns times sqrt(gamma); MLA's q_nope columns and kv_b's k_nope columns
    times sqrt(gamma), q_rope columns times gamma; kv_a (the shared rotary key) untouched.
    """
    c = config
    out = {s: {n: np.array(k, np.float64) for n, k in p.items()} for s, p in params.items()}
    q_name = "q_proj" if c.q_lora_rank is None else "q_b_proj"
    for layer, S_H in enumerate(np.asarray(max_logit_LH, np.float64)):
        k = c.first_k_dense
        stack, i = ("dense_layers", layer) if layer < k else ("moe_layers", layer - k)
        for h, S in enumerate(S_H):
            if not S > tau:
                continue
            gamma = tau / S
            if c.attention == "mha":
                cols = slice(h * c.head_dim, (h + 1) * c.head_dim)
                out[stack]["q_proj"][i][:, cols] *= np.sqrt(gamma)
                out[stack]["k_proj"][i][:, cols] *= np.sqrt(gamma)
                continue
            q0, kv0 = h * c.qk_head_dim, h * (c.qk_nope_head_dim + c.v_head_dim)
            nope = c.qk_nope_head_dim
            out[stack][q_name][i][:, q0 : q0 + nope] *= np.sqrt(gamma)
            out[stack][q_name][i][:, q0 + nope : q0 + c.qk_head_dim] *= gamma
            out[stack]["kv_b_proj"][i][:, kv0 : kv0 + nope] *= np.sqrt(gamma)
    return out


def _kernels(state, names) -> dict:
    return {
        s: {n: np.asarray(state[s]["attn"][n]["kernel"][...]) for n in names}
        for s in ("dense_layers", "moe_layers")
    }


def _tau_between(S_LH):
    """A threshold that clips about half the heads, in the widest gap between
    their max logits, so float32 rounding cannot move a head across it."""
    values = np.sort(S_LH.ravel())
    lo, hi = values.size // 4, 3 * values.size // 4
    i = lo + int(np.argmax(np.diff(values[lo:hi])))
    return float((values[i] + values[i + 1]) / 2)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_clip_matches_numpy_and_bounds_each_clipped_heads_logits_at_tau(kind):
    config = CONFIGS[kind]
    model = Transformer(config, rngs=nnx.Rngs(1))
    tokens = _tokens()
    ref_LBHN, inputs = _layer_logits(config, model, tokens)
    _, aux = model(tokens)
    S_LH = ref_LBHN.max(axis=(1, 3))
    np.testing.assert_allclose(aux.max_logit_LH, S_LH, rtol=1e-5)
    tau = _tau_between(S_LH)
    clipped_LH = S_LH > tau
    assert 0 < clipped_LH.sum() < clipped_LH.size

    params = nnx.state(model, nnx.Param)
    new = muonjax.apply_qk_clip(params, aux.max_logit_LH, tau, qk_clip_heads(config))

    # the parameters: NumPy's rule to float32 rounding; everything else bit-identical
    names = list(ATTENTION[config.attention].qk_clip_parts(config))
    want = _reference_clip(config, _kernels(params, names), S_LH, tau)
    got = _kernels(new, names)
    for s in want:
        for n in names:
            np.testing.assert_allclose(got[s][n], want[s][n], rtol=2e-6, err_msg=f"{s}.{n}")
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        b = dict(jax.tree_util.tree_leaves_with_path(new))[path]
        if not any(f"['{n}']" in jax.tree_util.keystr(path) for n in names):
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

    # each layer's logits from its clipped parameters, on the same input
    clipped_model = nnx.merge(*nnx.split(model))
    nnx.update(clipped_model, new)
    for layer, (block, x_BLD) in enumerate(zip(_blocks(clipped_model), inputs)):
        after_BHN = _valid_logits(config, block, x_BLD)
        for h in range(config.n_heads):
            before_BN, after_BN = ref_LBHN[layer][:, h], after_BHN[:, h]
            if clipped_LH[layer, h]:  # gamma x every logit: the max is tau
                gamma = tau / S_LH[layer, h]
                np.testing.assert_allclose(after_BN, gamma * before_BN, rtol=1e-5, atol=1e-6)
                assert after_BN.max() == pytest.approx(tau, rel=1e-5)
            else:  # the same parameters: the same logits, to the bit
                np.testing.assert_array_equal(after_BN, before_BN)


def test_tau_above_every_logit_changes_nothing_and_nonfinite_logits_clip_nothing():
    config = CONFIGS["mla"]
    model = Transformer(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    heads = qk_clip_heads(config)
    for S in (jnp.full((2, 4), 50.0), jnp.full((2, 4), jnp.nan), jnp.full((2, 4), jnp.inf)):
        new = muonjax.apply_qk_clip(params, S, 100.0, heads)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        muonjax.qk_clip_factors(jnp.asarray([50.0, 100.0, 400.0, jnp.nan]), 100.0),
        [1.0, 1.0, 0.25, 1.0],
    )


def _gqa_heads(path, leaf):
    """A user's model: unstacked layers, query kernels (embed, heads, head_dim)
    and a key kernel shared by all query heads (so only the query scales)."""
    name = jax.tree_util.keystr(path)
    layer = int(name[name.index("layer") + 5])
    if name.endswith("['wq']"):
        return muonjax.QKHeads(layers=layer, head_dim=8, parts=((0, 8, 1.0),))
    return None


def test_a_users_own_layout_and_the_optax_transformation():
    rng = np.random.default_rng(0)
    params = {
        f"layer{i}": {
            "wq": jnp.asarray(rng.normal(size=(16, 3, 8)), jnp.float32),
            "wk": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
        }
        for i in range(2)
    }
    S_LH = jnp.asarray([[1.0, 9.0, 4.0], [16.0, 2.0, 3.0]])
    new = muonjax.apply_qk_clip(params, S_LH, 4.0, _gqa_heads)
    for i in range(2):
        want = np.array(params[f"layer{i}"]["wq"])
        for h in range(3):
            want[:, h] *= min(1.0, 4.0 / float(S_LH[i, h]))
        np.testing.assert_allclose(new[f"layer{i}"]["wq"], want, rtol=1e-6)
        np.testing.assert_array_equal(new[f"layer{i}"]["wk"], params[f"layer{i}"]["wk"])

    # in an optax chain: params + updates = the clip of params + the inner updates
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    tx = optax.chain(optax.sgd(0.1), muonjax.qk_clip(4.0, _gqa_heads))
    updates, _ = tx.update(grads, tx.init(params), params, max_logits=S_LH)
    plain, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params), params)
    want = muonjax.apply_qk_clip(optax.apply_updates(params, plain), S_LH, 4.0, _gqa_heads)
    got = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # heads and leaves left alone get the inner update itself, to the bit
    np.testing.assert_array_equal(updates["layer0"]["wk"], plain["layer0"]["wk"])
    np.testing.assert_array_equal(updates["layer0"]["wq"][:, 0], plain["layer0"]["wq"][:, 0])
    np.testing.assert_array_equal(updates["layer1"]["wq"][:, 1:], plain["layer1"]["wq"][:, 1:])


def test_bad_layouts_are_clear_errors():
    params = {"layer0": {"wq": jnp.ones((16, 20))}}
    S = jnp.ones((1, 3)) * 10
    with pytest.raises(ValueError, match=r"\['layer0'\]\['wq'\].*heads x head_dim"):
        muonjax.apply_qk_clip(params, S, 4.0, _gqa_heads)
    bad_parts = lambda path, leaf: muonjax.QKHeads(0, 8, ((0, 6, 0.5), (4, 8, 1.0)))
    with pytest.raises(ValueError, match="disjoint"):
        muonjax.apply_qk_clip({"w": jnp.ones((4, 24))}, S, 4.0, bad_parts)
    stacked = lambda path, leaf: muonjax.QKHeads(slice(0, 1), 8, ((0, 8, 0.5),))
    with pytest.raises(ValueError, match="leading axis"):
        muonjax.apply_qk_clip({"w": jnp.ones((2, 4, 24))}, S, 4.0, stacked)
    with pytest.raises(ConfigError, match="--qk-clip"):
        TrainConfig(qk_clip=0.0)
    assert config_from_args(["--qk-clip", "100"]).qk_clip == 100.0


@pytest.mark.slow
def test_train_step_clips_by_its_own_forward_pass():
    """One step on 1 device: a tau above every logit is bit-identical to no
    clip; a tau between the heads' max logits gives the no-clip step's new
    parameters clipped by the initial parameters' logits on the batch, and logs
    how many heads it clipped."""
    config = CONFIGS["mha"].replace(first_k_dense=2)  # two dense layers: compiles faster
    tokens = _tokens(batch=8, length=33, seed=2)
    _, aux = Transformer(config, rngs=nnx.Rngs(0))(tokens[:, :-1])  # seed 0: the trainer's init
    tau = _tau_between(np.asarray(aux.max_logit_LH))
    one = make_mesh(parse_mesh("data=1"), devices=jax.devices()[:1])

    def step(qk_clip, mesh=one, mesh_text=None):
        train = TrainConfig(batch_size=8, seq_len=32, qk_clip=qk_clip, mesh=mesh_text)
        program = build(train, config, mesh)
        state, metrics = program.step(program.init(), jax.device_put(tokens, program.batch))
        return jax.device_get(state.params), jax.device_get(metrics)

    plain, _ = step(None)
    high, metrics = step(1e6)
    assert metrics["qk_clipped_heads"] == 0
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(high)):
        np.testing.assert_array_equal(a, b)

    clipped, metrics = step(tau)
    want = muonjax.apply_qk_clip(plain, aux.max_logit_LH, tau, qk_clip_heads(config))
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    S_LH = np.asarray(aux.max_logit_LH)
    assert metrics["qk_clipped_heads"] == (S_LH > tau).sum()
    np.testing.assert_array_equal(metrics["qk_clipped_heads_per_layer"], (S_LH > tau).sum(-1))

    # 8 devices, ZeRO-1 (Muon's state split over data): the same step
    sharded, metrics8 = step(tau, make_mesh(parse_mesh("data=8")), "data=8")
    assert metrics8["qk_clipped_heads"] == metrics["qk_clipped_heads"]
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(clipped)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
