"""The MoE transformer: shapes, causality, MoE against a per-token loop, routing,
balancing, gradients, presets and parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import muonjax
from muonjax.models import (
    ModelConfig,
    Transformer,
    balance_router_bias,
    flops_per_token,
    param_counts,
    preset,
)
from muonjax.models.dispatch import routed_experts
from muonjax.models.moe import MoE, balance_loss

TINY = preset("tiny")


def _tokens(shape, seed=0, vocab=256):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        TINY.replace(attention="mha", head_dim=16),
        TINY.replace(q_lora_rank=24),
        TINY.replace(first_k_dense=0, n_layers=3),
        TINY.replace(first_k_dense=2, n_layers=2),
    ],
    ids=["mla", "mha", "mla-q-lora", "all-moe", "all-dense"],
)
def test_output_shapes_and_aux(config):
    model = Transformer(config, rngs=nnx.Rngs(0))
    logits, aux = model(_tokens((3, 10)))
    assert logits.shape == (3, 10, config.vocab_size) and logits.dtype == jnp.float32
    assert aux.max_logit_LH.shape == (config.n_layers, config.n_heads)
    assert aux.expert_load_ME.shape == (config.n_moe_layers, config.n_routed_experts)
    assert np.all(np.isfinite(logits))
    if config.n_moe_layers:
        np.testing.assert_allclose(aux.expert_load_ME.sum(-1), 1.0, rtol=1e-6)
        assert float(aux.balance_loss) > 0


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_causality(attention):
    model = Transformer(TINY.replace(attention=attention), rngs=nnx.Rngs(1))
    tokens = _tokens((2, 12), seed=1)
    logits, _ = model(tokens)
    for t in (0, 5, 10):
        changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % 256)
        logits2, _ = model(changed)
        np.testing.assert_array_equal(logits[:, : t + 1], logits2[:, : t + 1])
        assert not np.allclose(logits[:, t + 1 :], logits2[:, t + 1 :])


def _naive_moe(x, experts, weights, gate, up, down):
    """Per-token loop in float64: y_t = sum_j w_tj SwiGLU_{e_tj}(x_t)."""
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    silu = lambda z: z / (1 + np.exp(-z))
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(np.asarray(experts[t]), np.asarray(weights[t], np.float64)):
            y[t] += w * (silu(x[t] @ gate[e]) * (x[t] @ up[e])) @ down[e]
    return y


@pytest.mark.parametrize("method", ["blocks", "ragged_dot"])
@pytest.mark.parametrize("skew", [False, True], ids=["uniform", "90pct-to-expert-0"])
def test_routed_experts_equal_per_token_loop(skew, method):
    T, D, F, E, K = 64, 16, 24, 8, 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, D)).astype(np.float32)
    gate, up = (rng.standard_normal((E, D, F)).astype(np.float32) * 0.3 for _ in range(2))
    down = rng.standard_normal((E, F, D)).astype(np.float32) * 0.3
    experts = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    if skew:
        experts[: int(0.9 * T), 0] = 0
        experts[: int(0.9 * T), 1] = 1 + rng.integers(0, E - 1, int(0.9 * T))
    weights = rng.random((T, K)).astype(np.float32)
    args = (jnp.asarray(x), jnp.asarray(experts), jnp.asarray(weights), gate, up, down)
    run = lambda x, w, g, u, d: routed_experts(x, args[1], w, g, u, d, method=method)
    got = run(args[0], *args[2:])
    expected = _naive_moe(x, experts, weights, gate, up, down)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())

    # gradients w.r.t. x, the routing weights and the three weight stacks
    # against autodiff of a dense formulation (every expert on every token,
    # zero weight where not chosen)
    def dense(x, w, g, u, d):
        h = jax.nn.silu(jnp.einsum("td,edf->etf", x, g)) * jnp.einsum("td,edf->etf", x, u)
        y = jnp.einsum("etf,efd->etd", h, d)
        gates = jnp.zeros((T, E)).at[jnp.arange(T)[:, None], args[1]].add(w)
        return jnp.einsum("te,etd->td", gates, y)

    cot = jax.random.normal(jax.random.key(0), (T, D))
    loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)
    grads = jax.grad(loss(run), argnums=(0, 1, 2, 3, 4))(args[0], *args[2:])
    ref = jax.grad(loss(dense), argnums=(0, 1, 2, 3, 4))(args[0], *args[2:])
    for g, r, name in zip(grads, ref, ["x", "weights", "gate", "up", "down"]):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max(), err_msg=name)


def test_moe_layer_equals_per_token_reference():
    config = TINY.replace(routed_scaling_factor=2.5, n_shared_experts=2)
    moe = MoE(config, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(3), (2, 16, config.d_model))
    y, aux = moe(x)
    x_TD = np.asarray(x.reshape(-1, config.d_model), np.float64)
    logits = x_TD @ np.asarray(moe.router.kernel[...], np.float64)
    scores = 1 / (1 + np.exp(-logits))
    experts = np.argsort(-scores, axis=-1, kind="stable")[:, : config.experts_per_token]
    weights = np.take_along_axis(scores, experts, -1)
    weights = 2.5 * weights / weights.sum(-1, keepdims=True)
    e = moe.experts
    routed = _naive_moe(x_TD, experts, weights, e.gate[...], e.up[...], e.down[...])
    s = moe.shared
    silu = lambda z: z / (1 + np.exp(-z))
    w = lambda lin: np.asarray(lin.kernel[...], np.float64)
    shared = (silu(x_TD @ w(s.gate)) * (x_TD @ w(s.up))) @ w(s.down)
    np.testing.assert_allclose(y.reshape(-1, config.d_model), routed + shared, rtol=1e-4, atol=1e-6)
    load = np.bincount(experts.reshape(-1), minlength=config.n_routed_experts) / experts.size
    np.testing.assert_allclose(aux.load_E, load, atol=1e-7)


@pytest.mark.parametrize("norm_topk", [True, False])
def test_router_weights(norm_topk):
    config = TINY.replace(norm_topk_prob=norm_topk, routed_scaling_factor=2.446)
    router = MoE(config, rngs=nnx.Rngs(4)).router
    x = jax.random.normal(jax.random.key(5), (32, config.d_model))
    scores, experts, weights = router(x)
    assert experts.shape == weights.shape == (32, config.experts_per_token)
    picked = np.take_along_axis(np.asarray(scores), np.asarray(experts), -1)
    if norm_topk:
        np.testing.assert_allclose(weights.sum(-1), 2.446, rtol=1e-6)
        np.testing.assert_allclose(
            weights, 2.446 * picked / picked.sum(-1, keepdims=True), rtol=1e-6
        )
    else:
        np.testing.assert_allclose(weights, 2.446 * picked, rtol=1e-6)


def test_bias_selects_but_does_not_weight():
    router = MoE(TINY, rngs=nnx.Rngs(6)).router
    x = jax.random.normal(jax.random.key(7), (32, TINY.d_model))
    router.bias[...] = jnp.zeros(8).at[3].set(10.0)  # force expert 3 into every top-k
    scores, experts, weights = router(x)
    assert np.all(np.any(np.asarray(experts) == 3, axis=-1))
    picked = np.take_along_axis(np.asarray(scores), np.asarray(experts), -1)
    np.testing.assert_allclose(weights, picked / picked.sum(-1, keepdims=True), rtol=1e-6)


def test_bias_update_moves_load_toward_balance():
    config = TINY
    moe = MoE(config, rngs=nnx.Rngs(8))
    # skew the router: experts 0 and 1 win for almost every token
    moe.router.kernel[...] = moe.router.kernel[...].at[:, :2].add(0.1)
    x = jax.random.normal(jax.random.key(9), (4, 64, config.d_model)) + 0.5

    @nnx.jit
    def load_of(moe, x):
        return moe(x)[1].load_E

    imbalance = lambda load: float(jnp.max(load) / jnp.mean(load))
    load = load_of(moe, x)
    start = imbalance(load)
    assert start > 3.0
    for _ in range(100):
        moe.router.bias[...] = balance_router_bias(moe.router.bias[...], load, rate=0.02)
        load = load_of(moe, x)
    assert imbalance(load) < 0.5 * start
    # the rule itself: +rate for underloaded, -rate for overloaded, zero-mean
    b = balance_router_bias(jnp.zeros(4), jnp.array([0.7, 0.1, 0.1, 0.1]), rate=1e-3)
    np.testing.assert_allclose(b, 1e-3 * np.array([-1.5, 0.5, 0.5, 0.5]), rtol=1e-6)


def test_balance_loss():
    # sum_i f_i P_i with sum_i f_i = E and sum_i P_i = 1: a balanced choice
    # (f_i = 1) gives 1 whatever the scores; choosing the experts the scores
    # favour, all tokens on experts 0 and 1 (f = 2, 2, 0, 0), gives 2.
    B, L, E, K = 2, 8, 4, 2
    scores = jnp.broadcast_to(jnp.array([1.0, 1.0, 1e-6, 1e-6]), (B, L, E))
    balanced = jnp.tile(jnp.array([[0, 1], [2, 3]]), (B, L // 2, 1))
    assert float(balance_loss(scores, balanced, E)) == pytest.approx(1.0)
    skewed = jnp.zeros((B, L, K), jnp.int32).at[..., 1].set(1)
    assert float(balance_loss(scores, skewed, E)) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.slow
def test_gradients_reach_every_expert_that_received_tokens():
    config = TINY.replace(n_layers=1, first_k_dense=0)
    model = Transformer(config, rngs=nnx.Rngs(10))
    tokens = _tokens((2, 6), seed=11)  # 12 tokens x 2 picks < 8 experts x 3
    _, aux = model(tokens)
    load = np.asarray(aux.expert_load_ME[0])

    def loss(m):
        logits, _ = m(tokens)
        return jnp.mean(logits**2)

    grads = nnx.grad(loss)(model)
    for name in ("gate", "up", "down"):
        g = np.asarray(getattr(grads.moe_layers.moe.experts, name)[...][0])
        norms = np.linalg.norm(g.reshape(g.shape[0], -1), axis=-1)
        assert np.all(norms[load > 0] > 0), name
        assert np.all(norms[load == 0] == 0), name
    assert np.linalg.norm(grads.moe_layers.moe.router.kernel[...]) > 0


def test_max_logit_matches_direct_computation():
    config = TINY.replace(attention="mha", head_dim=16, n_layers=1, first_k_dense=1)
    model = Transformer(config, rngs=nnx.Rngs(12))
    tokens = _tokens((2, 8), seed=13)
    _, aux = model(tokens)
    block = model.dense_layers
    x = model.embed(tokens)
    scale = np.asarray(block.attn_norm.scale[...][0])
    h = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + config.rms_norm_eps) * scale
    q = (h @ block.attn.q_proj.kernel[...][0]).reshape(2, 8, 4, 16)
    k = (h @ block.attn.k_proj.kernel[...][0]).reshape(2, 8, 4, 16)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    q, k = (
        muonjax.models.layers.rope(q, pos, config.rope_theta),
        muonjax.models.layers.rope(k, pos, config.rope_theta),
    )
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / 4.0
    logits = np.where(np.tril(np.ones((8, 8), bool)), logits, -np.inf)
    np.testing.assert_allclose(aux.max_logit_LH[0], logits.max(axis=(0, 2, 3)), rtol=1e-5)


def test_every_param_has_logical_axes_and_stacks_lead():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    for path, var in jax.tree_util.tree_leaves_with_path(
        nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)
    ):
        axes = var.out_sharding
        assert len(axes) == var[...].ndim, (path, axes)
        name = jax.tree_util.keystr(path)
        if "layers" in name:
            assert axes[0] == "layers"
        if "experts" in name:
            assert axes[1] == "experts" and var[...].ndim == 4
    labels = muonjax.moonlight_labels(nnx.state(model, nnx.Param))
    flat = {jax.tree_util.keystr(p): lab for p, lab in jax.tree_util.tree_leaves_with_path(labels)}
    adamw = sorted(k for k, v in flat.items() if v == "adamw")
    assert all(
        ("norm" in k and "scale" in k) or k.startswith(("['embed']", "['lm_head']")) for k in adamw
    )
    assert flat["['lm_head']['kernel'].value"] == flat["['embed']['embedding'].value"] == "adamw"
    assert flat["['moe_layers']['moe']['experts']['gate'].value"] == "muon"


def test_moonlight_preset_counts_from_shapes_alone():
    counts = param_counts(preset("moonlight-16b-a3b"))
    assert round(counts["total"] / 1e9, 2) == 15.96
    assert round(counts["active"] / 1e9, 2) == 2.91
    assert round(counts["total_non_embedding"] / 1e9, 2) == 15.29
    assert round(counts["active_non_embedding"] / 1e9, 2) == 2.24
    assert counts["embedding"] == 2 * 163840 * 2048


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="tiny, small, moonlight-16b-a3b"):
        preset("gpt-5")


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="experts_per_token=9"):
        ModelConfig(experts_per_token=9)
    with pytest.raises(ValueError, match="attention='gqa'"):
        ModelConfig(attention="gqa")
    with pytest.raises(ValueError, match="moe_dispatch='onehot'"):
        ModelConfig(moe_dispatch="onehot")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"kv_lora_rank": 0}, "kv_lora_rank=0 (must be positive)"),
        ({"qk_nope_head_dim": -1}, "qk_nope_head_dim=-1 (must be positive)"),
        ({"v_head_dim": 0}, "v_head_dim=0 (must be positive)"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size=0 (must be positive)"),
        ({"n_routed_experts": 0}, "n_routed_experts=0 (must be positive)"),
        ({"n_shared_experts": -1}, "n_shared_experts=-1 (must be >= 0)"),
        ({"qk_rope_head_dim": 0}, "qk_rope_head_dim=0 (must be >= 2)"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim=7 (must be even)"),
        ({"n_layers": "2"}, "n_layers='2' (must be an integer)"),
        ({"d_model": 64.0}, "d_model=64.0 (must be an integer)"),
        ({"vocab_size": True}, "vocab_size=True (must be an integer)"),
        ({"q_lora_rank": 0}, "q_lora_rank=0 (must be None or a positive integer)"),
        ({"rope_theta": 0.0}, "rope_theta=0.0 (must be positive and finite)"),
        ({"rms_norm_eps": float("inf")}, "rms_norm_eps=inf (must be positive and finite)"),
        ({"routed_scaling_factor": "2"}, "routed_scaling_factor='2' (must be positive and"),
        ({"init_std": -0.02}, "init_std=-0.02 (must be >= 0 and finite)"),
        ({"aux_loss_coef": float("nan")}, "aux_loss_coef=nan (must be >= 0 and finite)"),
        ({"remat": 1}, "remat=1 (valid: none, dots, full)"),
        ({"remat": "dot"}, "remat='dot' (valid: none, dots, full)"),
        ({"dtype": "float16"}, "dtype='float16' (valid: float32, bfloat16)"),
    ],
)
def test_every_field_has_its_type_and_range(changes, message):
    with pytest.raises(ValueError) as error:
        ModelConfig(**changes)
    assert message in str(error.value)


def test_config_problems_are_collected_and_ints_are_floats():
    with pytest.raises(ValueError) as error:
        ModelConfig(kv_lora_rank=0, n_layers="2", experts_per_token=99, rope_theta=-1)
    for name in ("kv_lora_rank=0", "n_layers='2'", "experts_per_token=99", "rope_theta=-1"):
        assert name in str(error.value)
    assert ModelConfig(rope_theta=10000, init_std=0).rope_theta == 10000


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_flops_per_token_matches_xla_count(attention):
    # one dense layer: XLA's cost analysis counts a scan body once, so only a
    # stack of one layer is counted in full
    config = preset("small").replace(n_layers=1, first_k_dense=1, attention=attention, head_dim=32)
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((4, 129), jnp.int32)

    def loss(state):
        logits, _ = nnx.merge(graphdef, state)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    counted = jax.jit(jax.grad(loss)).lower(state).compile().cost_analysis()["flops"]
    assert counted == pytest.approx(flops_per_token(config, 128) * 4 * 128, rel=0.03)


def test_remat_old_booleans_are_policies():
    """Saved configs and older code give remat as a bool: True is full, False none."""
    assert ModelConfig(remat=True).remat == "full"
    assert ModelConfig(remat=False).remat == "none"
    assert TINY.remat == "none" and preset("moonlight-16b-a3b").remat == "full"
    assert TINY.replace(remat=True) == TINY.replace(remat="full")


@pytest.mark.slow
def test_remat_changes_memory_not_results():
    tokens = _tokens((2, 16), seed=14)

    def grads(config):
        graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))

        def loss(state):
            logits, aux = nnx.merge(graphdef, state)(tokens)
            return jnp.mean(logits**2) + aux.balance_loss

        return jax.jit(jax.value_and_grad(loss))(state)

    plain = jax.tree.leaves(grads(TINY))
    for policy in ("dots", "full"):
        for a, b in zip(plain, jax.tree.leaves(grads(TINY.replace(remat=policy)))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_remat_policies_order_peak_memory():
    """none stores every activation, dots only the matmul outputs, full each layer's
    input: the compiled step's temporaries shrink in that order (on CPU, from shapes;
    at 4 x 128 tokens and 4 layers the activations outweigh remat's own buffers)."""
    tokens = jax.ShapeDtypeStruct((4, 128), jnp.int32)

    def temp_bytes(policy):
        config = TINY.replace(n_layers=4, remat=policy)
        graphdef, state = nnx.eval_shape(lambda: nnx.split(Transformer(config, rngs=nnx.Rngs(0))))

        def loss(state, tokens):
            logits, aux = nnx.merge(graphdef, state)(tokens)
            return jnp.mean(logits**2) + aux.balance_loss

        compiled = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    none, dots, full = (temp_bytes(p) for p in ("none", "dots", "full"))
    assert none > dots > full, (none, dots, full)
