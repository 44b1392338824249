"""moonlight: routing, and each branch equal to its standalone optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import muonjax

L, D, V, F = 2, 16, 40, 24


def _params(seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return {
        "embed": {"embedding": normal(V, D)},
        "layers": {
            "attn": {"kernel": normal(L, D, D)},
            "mlp": {"kernel": normal(L, D, F), "bias": normal(L, F)},
            "norm": {"scale": normal(L, D)},
            "moe": {"experts": normal(L, 4, D, F)},
        },
        "final_norm": {"scale": normal(D)},
        "lm_head": {"kernel": normal(D, V)},
        "gain": normal(),
    }


EXPECTED = {
    "embed": {"embedding": "adamw"},
    "layers": {
        "attn": {"kernel": "muon"},
        "mlp": {"kernel": "muon", "bias": "adamw"},
        "norm": {"scale": "adamw"},
        "moe": {"experts": "muon"},
    },
    "final_norm": {"scale": "adamw"},
    "lm_head": {"kernel": "adamw"},
    "gain": "adamw",
}


def test_default_labels():
    assert muonjax.moonlight_labels(_params()) == EXPECTED


def test_labels_on_flax_nnx_state():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(V, D, rngs=rngs)
            self.proj = nnx.Linear(D, D, rngs=rngs)
            self.norm = nnx.RMSNorm(D, rngs=rngs)
            self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    flat = _flat(muonjax.moonlight_labels(nnx.state(Model(nnx.Rngs(0)), nnx.Param)))
    assert {
        k.split("]")[0] + "]": v for k, v in flat.items() if "kernel" in k or "embedding" in k
    } == {
        "['embed']": "adamw",
        "['proj']": "muon",
        "['lm_head']": "adamw",
    }
    assert flat["['proj']['bias'].value"] == "adamw"
    assert flat["['norm']['scale'].value"] == "adamw"


def _flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow
def test_each_group_gets_its_own_optimizer_with_shared_lr_and_wd():
    params = _params(0)
    grads = [_params(1 + t) for t in range(3)]
    lr, wd = 0.01, 0.1
    tx = muonjax.moonlight(lr, weight_decay=wd)
    state = tx.init(params)
    p = params
    for g in grads:
        updates, state = jax.jit(tx.update)(g, state, p)
        p = optax.apply_updates(p, updates)

    labels = _flat(muonjax.moonlight_labels(params))
    for label, ref_tx in [
        ("muon", muonjax.muon(lr, weight_decay=wd)),
        ("adamw", optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd)),
    ]:
        pick = lambda t, label=label: {k: v for k, v in _flat(t).items() if labels[k] == label}
        ref_p = pick(params)
        ref_state = ref_tx.init(ref_p)
        for g in grads:
            ref_u, ref_state = ref_tx.update(pick(g), ref_state, ref_p)
            ref_p = optax.apply_updates(ref_p, ref_u)
        got = pick(p)
        assert got.keys() == ref_p.keys() and got
        for k in got:
            np.testing.assert_allclose(got[k], ref_p[k], atol=1e-6, err_msg=k)


def test_custom_labels():
    params = _params()
    everything_adamw = lambda tree: jax.tree.map(lambda _: "adamw", tree)
    tx = muonjax.moonlight(0.01, labels=everything_adamw)
    updates, _ = tx.update(_params(1), tx.init(params), params)
    ref, _ = optax.adamw(0.01, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1).update(
        _params(1), optax.adamw(0.01).init(params), params
    )
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_vector_labelled_muon_is_a_clear_error():
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    tx = muonjax.moonlight(0.01, labels=lambda t: {"w": "muon", "b": "muon"})
    with pytest.raises(ValueError, match=r"\['b'\].*shape \(4,\)"):
        tx.init(params)


def test_schedule_and_inject_hyperparams():
    params = _params()
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)
    tx = optax.inject_hyperparams(muonjax.moonlight, static_args=("ns_steps",))(
        learning_rate=schedule
    )
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates, state = step(_params(1), state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))  # lr 0 at step 0
    updates, state = step(_params(2), state, params)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(5e-3)
    assert all(np.all(np.isfinite(u)) and np.any(u != 0) for u in jax.tree.leaves(updates))


def test_works_with_nnx_optimizer():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(V, D, rngs=rngs)
            self.proj = nnx.Linear(D, D, rngs=rngs)
            self.norm = nnx.RMSNorm(D, rngs=rngs)
            self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

        def __call__(self, tokens):
            return self.lm_head(self.norm(jax.nn.gelu(self.proj(self.embed(tokens)))))

    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, muonjax.moonlight(3e-2, weight_decay=0.0), wrt=nnx.Param)
    tokens = jnp.arange(32) % V
    targets = (tokens * 7 + 3) % V

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(tokens), targets).mean()

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def test_muon_momentum_is_reachable_in_one_call():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    tx = optax.inject_hyperparams(muonjax.moonlight)(learning_rate=0.1)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    momentum = muonjax.muon_momentum(state)  # after one step M = G on Muon's leaves
    np.testing.assert_array_equal(
        momentum["layers"]["moe"]["experts"], grads["layers"]["moe"]["experts"]
    )
    assert isinstance(momentum["embed"]["embedding"], optax.MaskedNode)  # AdamW's leaf
    with pytest.raises(KeyError, match="Found multiple values for 'mu'"):  # why it exists
        optax.tree_utils.tree_get(state, "mu")
    with pytest.raises(ValueError, match="holds 0 Muon states"):
        muonjax.muon_momentum(optax.adamw(0.1).init(params))
