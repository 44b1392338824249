"""Routing: moonlight_labels' defaults and extensions, routing_table, and moonlight's optax manners
(tree_map_params, inject_hyperparams, AdamW moments in float32)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import muonjax
from muonjax.optim.newton_schulz import newton_schulz_flops
from muonjax.optim.routing_table import LeafInfo, routing_table

D, V = 16, 40


def _flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _kernel(*shape):
    return jnp.zeros(shape)


# ---- moonlight_labels ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name, group",
    [
        ("head", "adamw"),  # timm / ViT classifier
        ("classifier", "adamw"),  # Hugging Face classifiers
        ("wte", "adamw"),  # nanoGPT token embedding
        ("wpe", "adamw"),  # nanoGPT position embedding
        ("tok_emb", "adamw"),  # minGPT
        ("pos_emb", "adamw"),
        ("lm_head", "adamw"),
        ("Head", "adamw"),  # names compare ignoring case
        ("LM_Head", "adamw"),
        ("embed_tokens", "adamw"),  # the "embed" substring rule
        ("word_embeddings", "adamw"),
        ("output", "muon"),  # BERT's layer/N/output/dense is a hidden matrix
        ("heads", "muon"),  # whole keys only: not "head"
        ("q_head", "muon"),
        ("header", "muon"),
        ("emb", "muon"),
    ],
)
def test_default_names(name, group):
    params = {"blocks": {"0": {name: {"kernel": _kernel(D, D)}}}, "mlp": {"kernel": _kernel(D, D)}}
    assert muonjax.moonlight_labels(params) == {
        "blocks": {"0": {name: {"kernel": group}}},
        "mlp": {"kernel": "muon"},
    }


def test_nanogpt_style_tree():
    params = {
        "wte": _kernel(V, D),
        "wpe": _kernel(8, D),
        "h_0": {
            "attn": {"c_attn": {"kernel": _kernel(D, 3 * D), "bias": _kernel(3 * D)}},
            "ln_1": {"scale": _kernel(D), "bias": _kernel(D)},
        },
        "lm_head": _kernel(D, V),
    }
    labels = _flat(muonjax.moonlight_labels(params))
    assert {k for k, v in labels.items() if v == "muon"} == {"['h_0']['attn']['c_attn']['kernel']"}


def test_extra_names_and_predicate():
    params = {
        "output": {"kernel": _kernel(D, V)},
        "block": {"proj": _kernel(D, D), "router": _kernel(D, 4)},
        "cls_token": _kernel(1, 1, D),
    }
    base = muonjax.moonlight_labels(params)
    assert set(jax.tree.leaves(base)) == {"muon"}

    more = muonjax.moonlight_labels(params, adamw_names=("OUTPUT", "router"))
    assert more["output"]["kernel"] == "adamw" and more["block"]["router"] == "adamw"
    assert more["block"]["proj"] == "muon" and more["cls_token"] == "muon"
    # a single string is one name, not its letters
    assert muonjax.moonlight_labels(params, adamw_names="output")["block"]["proj"] == "muon"

    seen = []

    def tokens_or_tiny(path, leaf):
        seen.append(jax.tree_util.keystr(path))
        return min(leaf.shape[-2:]) == 1

    labels = muonjax.moonlight_labels(params, adamw_names=("output",), adamw_if=tokens_or_tiny)
    assert labels["cls_token"] == "adamw" and labels["block"]["proj"] == "muon"
    assert "['cls_token']" in seen


def test_labels_on_shape_dtype_structs_and_nnx_state():
    params = {"head": {"kernel": _kernel(D, V)}, "proj": _kernel(D, D), "b": _kernel(D)}
    abstract = jax.eval_shape(lambda: params)
    assert muonjax.moonlight_labels(abstract) == muonjax.moonlight_labels(params)

    class Classifier(nnx.Module):
        def __init__(self, rngs):
            self.tok_emb = nnx.Param(jnp.zeros((V, D)))
            self.proj = nnx.Linear(D, D, rngs=rngs)
            self.classifier = nnx.Linear(D, 3, rngs=rngs)

    state = nnx.state(Classifier(nnx.Rngs(0)), nnx.Param)
    labels = _flat(muonjax.moonlight_labels(state))
    assert labels == {
        "['classifier']['bias'].value": "adamw",
        "['classifier']['kernel'].value": "adamw",
        "['proj']['bias'].value": "adamw",
        "['proj']['kernel'].value": "muon",
        "['tok_emb'].value": "adamw",
    }


def test_muonjax_model_routing_unchanged():
    from muonjax.models.config import preset
    from muonjax.models.counts import abstract_model

    state = nnx.state(abstract_model(preset("tiny")), nnx.Param)
    adamw = {k for k, v in _flat(muonjax.moonlight_labels(state)).items() if v == "adamw"}
    assert adamw == {
        k
        for k in _flat(state)
        if k.endswith("['scale'].value")
        or k in ("['embed']['embedding'].value", "['lm_head']['kernel'].value")
    }


def test_moonlight_with_extended_labels():
    params = {"output": _kernel(D, V) + 1.0, "proj": _kernel(D, D) + 1.0}
    grads = jax.tree.map(
        lambda p: jnp.arange(p.size, dtype=p.dtype).reshape(p.shape) / p.size, params
    )
    labels = functools.partial(muonjax.moonlight_labels, adamw_names=("output",))
    tx = muonjax.moonlight(0.01, labels=labels)
    updates, _ = tx.update(grads, tx.init(params), params)
    adamw = optax.adamw(0.01, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    ref, _ = adamw.update(grads["output"], adamw.init(params["output"]), params["output"])
    np.testing.assert_allclose(updates["output"], ref, rtol=1e-6)
    default, _ = muonjax.moonlight(0.01).update(grads, muonjax.moonlight(0.01).init(params), params)
    assert not np.allclose(default["output"], ref)  # Muon's, by default
    for tx in (muonjax.moonlight(0.01, adamw_names="output"),  # on the recipe itself
               muonjax.moonlight(0.01, adamw_if=lambda path, leaf: leaf.shape == (D, V))):  # fmt: skip
        again, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(again["output"], ref, rtol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        muonjax.moonlight(0.01, labels=labels, adamw_names="output")


@pytest.mark.parametrize("as_function", [True, False])
def test_a_label_typo_names_its_leaf(as_function):
    params = {"blocks": [{"w": _kernel(D, D)}, {"w": _kernel(D, D)}]}
    tree = {"blocks": [{"w": "muon"}, {"w": "adamW"}]}
    with pytest.raises(ValueError, match=r"labels gave 'adamW' for \['blocks'\]\[1\]\['w'\]"):
        muonjax.moonlight(0.01, labels=(lambda p: tree) if as_function else tree).init(params)


# ---- routing_table -------------------------------------------------------------------


def _mixed():
    return {
        "embed": {"embedding": jnp.zeros((V, D))},
        "layers": {
            "attn": {"kernel": jnp.zeros((2, D, D))},
            "mlp": {"kernel": jnp.zeros((2, D, 24)), "bias": jnp.zeros((2, 24))},
            "qkv": {"kernel": jnp.zeros((D, 4, 8))},
        },
        "wide": jnp.zeros((8, 64), jnp.bfloat16),
        "head": {"kernel": jnp.zeros((D, 10))},
        "gain": jnp.zeros(()),
    }


def _qkv_axes(path, leaf):
    if "qkv" in jax.tree_util.keystr(path):
        return muonjax.MatrixAxes(rows=(-3,), cols=(-2, -1))
    return None


def test_routing_table_rows():
    rows = routing_table(_mixed(), matrix_axes=_qkv_axes)
    assert all(isinstance(r, LeafInfo) for r in rows)
    by_path = {r.path: r for r in rows}
    assert list(by_path) == [  # tree order
        "embed/embedding",
        "gain",
        "head/kernel",
        "layers/attn/kernel",
        "layers/mlp/bias",
        "layers/mlp/kernel",
        "layers/qkv/kernel",
        "wide",
    ]
    for path in ("embed/embedding", "gain", "head/kernel", "layers/mlp/bias"):
        r = by_path[path]
        assert (r.group, r.matrix, r.stack, r.scale, r.ns_flops) == ("adamw", None, None, None, 0)
    assert by_path["head/kernel"].shape == (D, 10) and by_path["gain"].shape == ()

    # (path, matrix, stack, 0.2 sqrt(max(A, B)), Newton-Schulz FLOPs by hand)
    # square 16x16: 5 steps of 4 m^2 n + 2 m^3 = 6 * 16^3 per matrix
    # 16x24: 2 * 24 = 3 * 16, not past the Gram form's threshold: 5 (4 16^2 24 + 2 16^3)
    # 8x64: Gram form, 4 m^2 n + (8 k - 6) m^3 = 4 * 64 * 64 + 34 * 512
    expected = [
        ("layers/attn/kernel", (16, 16), 2, 0.2 * 4.0, 2 * 5 * 6 * 16**3),
        ("layers/mlp/kernel", (16, 24), 2, 0.2 * math.sqrt(24), 2 * 5 * (4 * 256 * 24 + 2 * 16**3)),
        ("layers/qkv/kernel", (16, 32), 1, 0.2 * math.sqrt(32), 4 * 256 * 32 + 34 * 16**3),
        ("wide", (8, 64), 1, 0.2 * 8.0, 4 * 64 * 64 + 34 * 8**3),
    ]
    for path, matrix, stack, scale, flops in expected:
        r = by_path[path]
        assert r.group == "muon" and r.matrix == matrix and r.stack == stack, path
        assert r.scale == pytest.approx(scale), path
        assert r.ns_flops == flops == newton_schulz_flops((stack, *matrix)), path
        assert r.size == math.prod(r.shape)
    assert by_path["wide"].dtype == "bfloat16" and by_path["gain"].dtype == "float32"


def test_routing_table_rules_and_inputs():
    params = _mixed()
    rows = routing_table(params, matrix_axes=_qkv_axes)
    # the same from jax.eval_shape output, and from a labels tree
    assert routing_table(jax.eval_shape(lambda: params), matrix_axes=_qkv_axes) == rows
    labels = muonjax.moonlight_labels(params)
    assert routing_table(params, labels=labels, matrix_axes=_qkv_axes) == rows

    def scales(**kw):
        return {r.path: r.scale for r in routing_table(params, **kw) if r.group == "muon"}

    assert scales(update_scale="hidden", hidden_size=64, rms_scale=0.3) == {
        p: pytest.approx(0.3 * 8.0)
        for p in ("layers/attn/kernel", "layers/mlp/kernel", "layers/qkv/kernel", "wide")
    }
    assert scales(update_scale="jordan") == {
        "layers/attn/kernel": 1.0,
        "layers/mlp/kernel": pytest.approx(math.sqrt(24 / 16)),
        "layers/qkv/kernel": pytest.approx(math.sqrt(4 * 8 / 16)),
        "wide": pytest.approx(math.sqrt(64 / 8)),
    }
    assert set(scales(update_scale="update_norm").values()) == {"0.2/RMS(O)"}
    with pytest.raises(ValueError, match="hidden_size"):
        routing_table(params, update_scale="hidden")
    with pytest.raises(ValueError, match="valid rules"):
        routing_table(params, update_scale="nope")
    with pytest.raises(ValueError, match=r"\['gain'\] has shape \(\)"):
        routing_table(params, labels=lambda t: jax.tree.map(lambda _: "muon", t))

    # extension, as moonlight takes it
    extended = routing_table(
        params, labels=functools.partial(muonjax.moonlight_labels, adamw_names=("wide",))
    )
    assert {r.path for r in extended if r.group == "muon"} == {
        "layers/attn/kernel",
        "layers/mlp/kernel",
        "layers/qkv/kernel",
    }


def test_routing_table_text_and_nnx_state():
    params = _mixed()
    text = str(routing_table(params, matrix_axes=_qkv_axes))
    lines = text.splitlines()
    assert lines[0].split() == [
        "path",
        "shape",
        "dtype",
        "group",
        "params",
        "matrix",
        "stack",
        "scale",
        "NS",
        "FLOPs",
    ]
    assert len(lines) == 2 + 8 + 1
    row = lines[2 + 3].split()  # layers/attn/kernel
    assert row[:7] == ["layers/attn/kernel", "(2,", "16,", "16)", "float32", "muon", "512"]
    assert row[7:9] == ["16x16", "2"]
    total = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params))
    muon_size = 2 * 16 * 16 + 2 * 16 * 24 + 16 * 32 + 8 * 64
    assert lines[-1] == (
        f"total: 8 leaves, {total:,} params; muon 4 leaves, {muon_size:,} params "
        f"({100 * muon_size / total:.1f}%), 779k Newton-Schulz FLOPs per step"
    )

    model = nnx.Linear(D, 24, rngs=nnx.Rngs(0))
    rows = routing_table(nnx.state(model, nnx.Param))
    assert [(r.path, r.group, r.matrix) for r in rows] == [
        ("bias", "adamw", None),
        ("kernel", "muon", (16, 24)),
    ]
    abstract = nnx.state(nnx.eval_shape(lambda: nnx.Linear(D, 24, rngs=nnx.Rngs(0))), nnx.Param)
    assert routing_table(abstract) == rows


# ---- optax.tree_map_params -----------------------------------------------------------


def _sharding_for(mesh, x):
    """Rows over "data" where they divide, else replicated: a stand-in for real rules."""
    shape = np.shape(x)
    if shape and shape[0] % mesh.size == 0:
        return NamedSharding(mesh, P("data"))
    return NamedSharding(mesh, P())


@pytest.mark.parametrize("which", ["moonlight", "muon", "moonlight_bf16_adam"])
def test_tree_map_params_gives_state_shardings(which):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    if which == "muon":
        tx = muonjax.muon(1e-3)
        params = {"w": jnp.ones((16, 8)), "stack": jnp.ones((8, 4, 4)), "odd": jnp.ones((3, 5))}
    else:
        tx = muonjax.moonlight(1e-3, adam_dtype=None if which == "moonlight" else "float32")
        params = {
            "embed": {"embedding": jnp.ones((V, D))},
            "w": jnp.ones((16, 8)),
            "stack": jnp.ones((8, 4, 4)),
            "norm": {"scale": jnp.ones((D,))},
        }
    abstract_state = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, P())

    # one argument: the state's own param-shaped leaves
    shardings = optax.tree_map_params(
        tx,
        lambda x: _sharding_for(mesh, x),
        abstract_state,
        transform_non_params=lambda _: replicated,
    )
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(state)):
        assert x.sharding == s

    # extra param-shaped trees: the params' shardings carried to their state copies
    param_shardings = jax.tree.map(lambda x: _sharding_for(mesh, x), params)
    carried = optax.tree_map_params(
        tx,
        lambda x, s: x if isinstance(x, optax.MaskedNode) else s,
        abstract_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    assert jax.tree.structure(carried) == jax.tree.structure(shardings)
    assert carried == shardings
    state = jax.jit(tx.init, out_shardings=carried)(params)
    updates, _ = jax.jit(tx.update)(params, state, params)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))


# ---- AdamW moments in float32 --------------------------------------------------------


def _adam_states(state):
    return [s for _, s in optax.tree_utils.tree_get_all_with_path(state, "ScaleByAdamState")]


def test_adamw_moments_float32_for_bf16_params():
    rng = np.random.default_rng(0)
    f32 = {
        "embed": {"embedding": jnp.asarray(rng.standard_normal((V, D)), jnp.float32)},
        "proj": jnp.asarray(rng.standard_normal((D, D)), jnp.float32),
        "norm": {"scale": jnp.asarray(1.0 + 0.1 * rng.standard_normal(D), jnp.float32)},
    }
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32)
    grads = [
        jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16), params)
        for _ in range(3)
    ]
    tx = muonjax.moonlight(1e-2)  # adam_dtype="float32" by default
    state = tx.init(params)
    (adam,) = _adam_states(state)
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype("float32")}

    ref_tx = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    pick = lambda t: {"embed": t["embed"], "norm": t["norm"]}  # the AdamW leaves
    up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
    ref_params = up(pick(params))
    ref_state = ref_tx.init(ref_params)
    step = jax.jit(tx.update)
    for g in grads:
        updates, state = step(g, state, params)
        ref_updates, ref_state = ref_tx.update(up(pick(g)), ref_state, ref_params)
        assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype("bfloat16")}
        for a, b in zip(jax.tree.leaves(pick(updates)), jax.tree.leaves(ref_updates)):
            np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2**-8, atol=1e-9)
    (adam,) = _adam_states(state)
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype("float32")}
    ref_adam = _adam_states(ref_state)[0]
    np.testing.assert_allclose(adam.nu["norm"]["scale"], ref_adam.nu["norm"]["scale"], rtol=1e-6)

    # None: optax's own behaviour, moments in the params' dtype
    (adam,) = _adam_states(muonjax.moonlight(1e-2, adam_dtype=None).init(params))
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype("bfloat16")}
    # mu_dtype still sets the first moment's
    (adam,) = _adam_states(muonjax.moonlight(1e-2, mu_dtype="bfloat16").init(params))
    assert jax.tree.leaves(adam.mu)[0].dtype == jnp.bfloat16
    assert jax.tree.leaves(adam.nu)[0].dtype == jnp.float32


# ---- optax.inject_hyperparams --------------------------------------------------------

HYPERPARAMS = {
    "learning_rate": (1e-2, 3e-2),
    "weight_decay": (0.1, 0.3),
    "momentum": (0.9, 0.5),
    "rms_scale": (0.2, 0.4),
    "eps": (1e-7, 1.0),
    "adam_b1": (0.9, 0.5),
    "adam_b2": (0.95, 0.5),
    "adam_eps": (1e-8, 1.0),
    "adamw_weight_decay": (0.05, 0.5),
}


def _inject_params():
    rng = np.random.default_rng(1)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    params = {"embed": {"embedding": normal(V, D)}, "proj": normal(2, D, D), "b": normal(D)}
    grads = [
        jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
        for _ in range(2)
    ]
    return params, grads


@pytest.fixture(scope="module")
def injected():
    params, (g1, g2) = _inject_params()
    tx = optax.inject_hyperparams(muonjax.moonlight)(**{k: v for k, (v, _) in HYPERPARAMS.items()})
    step = jax.jit(tx.update)
    _, state = step(g1, tx.init(params), params)
    updates, _ = step(g2, state, params)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))
    return step, state, params, g2, updates


@pytest.mark.parametrize("name", list(HYPERPARAMS))
def test_inject_hyperparams_get_and_set(injected, name):
    step, state, params, g2, updates = injected
    old, new = HYPERPARAMS[name]
    assert float(optax.tree_utils.tree_get(state, name)) == pytest.approx(old, rel=1e-6)
    changed = optax.tree_utils.tree_set(state, **{name: jnp.asarray(new, jnp.float32)})
    assert float(optax.tree_utils.tree_get(changed, name)) == pytest.approx(new)
    new_updates, _ = step(g2, changed, params)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(new_updates))
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(new_updates), jax.tree.leaves(updates))
    )
    assert diff > 1e-5, f"setting {name} did not change the update"


def test_inject_hyperparams_hidden_size_and_static_labels():
    params, (g1, g2) = _inject_params()
    tx = optax.inject_hyperparams(muonjax.moonlight, static_args=("labels",))(
        learning_rate=1e-2,
        update_scale="hidden",
        hidden_size=16,
        labels=functools.partial(muonjax.moonlight_labels, adamw_names=("b",)),
    )
    step = jax.jit(tx.update)
    updates, state = step(g1, tx.init(params), params)
    assert float(optax.tree_utils.tree_get(state, "hidden_size")) == 16
    changed = optax.tree_utils.tree_set(state, hidden_size=jnp.asarray(64.0))
    a, _ = step(g2, state, params)
    b, _ = step(g2, changed, params)
    # "hidden": Muon's update scales with sqrt(H), weight decay aside
    wd = 0.1 * 1e-2 * params["proj"]
    np.testing.assert_allclose(b["proj"] + wd, 2 * (a["proj"] + wd), rtol=1e-4, atol=1e-7)
