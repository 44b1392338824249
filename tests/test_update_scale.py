"""Update-scale rules of paper Sec. 3.1 (Eq. 5-7, Table 1) and Keller Jordan's,
against the float64 reference; and moonlight's weight-decay and dtype options."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import muon_step

import muonjax

SHAPES = {"square": (32, 32), "tall": (48, 16), "wide": (16, 48), "stack": (3, 16, 24)}
HIDDEN = 40


def _tree(shapes, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _rms_per_matrix(x):
    x = np.asarray(x, np.float64)
    return np.sqrt(np.mean(x**2, axis=(-2, -1)))


def test_rules_are_exported():
    assert muonjax.UPDATE_SCALE_RULES == ("moonlight", "hidden", "update_norm", "jordan")
    assert muonjax.optim.UPDATE_SCALE_RULES is muonjax.UPDATE_SCALE_RULES


@pytest.mark.parametrize("rule", ["moonlight", "hidden", "update_norm", "jordan"])
def test_muon_matches_float64_reference_one_and_two_steps(rule):
    lr, wd = 0.05, 0.1
    params = _tree(SHAPES, seed=0)
    grads = [_tree(SHAPES, seed=1), _tree(SHAPES, seed=2)]
    tx = muonjax.muon(lr, weight_decay=wd, update_scale=rule, hidden_size=HIDDEN)
    state, step = tx.init(params), jax.jit(tx.update)
    got = params
    ref = {k: (params[k], np.zeros(s)) for k, s in SHAPES.items()}
    for g in grads:  # after step 1, and after step 2 with momentum carried
        updates, state = step(g, state, got)
        got = optax.apply_updates(got, updates)
        for name in SHAPES:
            w, m = ref[name]
            ref[name] = muon_step(
                w, g[name], m, lr=lr, wd=wd, update_scale=rule, hidden_size=HIDDEN
            )
            change_ref = ref[name][0] - params[name]
            change = np.asarray(got[name], np.float64) - params[name]
            scale = np.abs(change_ref).max()
            np.testing.assert_allclose(
                change, change_ref, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{rule} {name}"
            )


def test_moonlight_rule_is_bit_identical_to_rms_scale_sqrt_max_side():
    updates = _tree(SHAPES, seed=3)
    got, _ = muonjax.scale_by_shape(rms_scale=0.3).update(updates, optax.EmptyState())
    for name, shape in SHAPES.items():
        a, b = shape[-2:]
        u = jnp.asarray(updates[name])
        np.testing.assert_array_equal(got[name], (u * (0.3 * max(a, b) ** 0.5)).astype(u.dtype))
    default, _ = muonjax.scale_by_shape(rms_scale=0.3, rule="moonlight").update(
        updates, optax.EmptyState()
    )
    jax.tree.map(np.testing.assert_array_equal, got, default)


def test_update_norm_makes_each_matrix_rms_exactly_rms_scale():
    rng = np.random.default_rng(4)
    # matrices of one stack with very different sizes, and a tall and a wide one
    stack = rng.standard_normal((3, 16, 24)) * np.array([1e-3, 1.0, 1e3])[:, None, None]
    updates = {
        "stack": jnp.asarray(stack, jnp.float32),
        "tall": jnp.asarray(rng.standard_normal((48, 16)) * 7, jnp.float32),
        "wide": jnp.asarray(rng.standard_normal((16, 48)) / 7, jnp.float32),
    }
    tx = muonjax.scale_by_shape(rms_scale=0.25, rule="update_norm")
    got, _ = tx.update(updates, tx.init(updates))
    np.testing.assert_allclose(_rms_per_matrix(got["stack"]), [0.25] * 3, rtol=1e-6)
    np.testing.assert_allclose(_rms_per_matrix(got["tall"]), 0.25, rtol=1e-6)
    np.testing.assert_allclose(_rms_per_matrix(got["wide"]), 0.25, rtol=1e-6)


def test_update_norm_keeps_zero_zero_and_the_input_dtype():
    zero = {"w": jnp.zeros((2, 8, 4), jnp.float32)}
    got, _ = muonjax.scale_by_shape(rule="update_norm").update(zero, optax.EmptyState())
    assert np.all(np.asarray(got["w"]) == 0)
    half = {"w": jax.random.normal(jax.random.key(0), (8, 4), jnp.bfloat16)}
    got, _ = muonjax.scale_by_shape(rule="update_norm").update(half, optax.EmptyState())
    assert got["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(_rms_per_matrix(got["w"].astype(jnp.float32)), 0.2, rtol=1e-2)


def test_hidden_uses_one_scale_for_every_shape():
    shapes = {"square": (32, 32), "tall": (256, 16), "wide": (16, 256), "stack": (2, 8, 64)}
    ones = {k: jnp.ones(s, jnp.float32) for k, s in shapes.items()}
    got, _ = muonjax.scale_by_shape(rms_scale=0.2, rule="hidden", hidden_size=64).update(
        ones, optax.EmptyState()
    )
    for name in shapes:
        np.testing.assert_allclose(np.asarray(got[name]), 0.2 * 8.0, rtol=1e-7)


def test_jordan_scales_by_sqrt_fan_out_over_fan_in_and_ignores_rms_scale():
    ones = {"up": jnp.ones((64, 256)), "down": jnp.ones((256, 64)), "sq": jnp.ones((3, 32, 32))}
    got, _ = muonjax.scale_by_shape(rms_scale=0.5, rule="jordan").update(ones, optax.EmptyState())
    # (fan_in, fan_out) = (64, 256): PyTorch's (out, in) = (256, 64) -> sqrt(256 / 64) = 2
    np.testing.assert_array_equal(np.asarray(got["up"]), 2.0)
    np.testing.assert_array_equal(np.asarray(got["down"]), 1.0)
    np.testing.assert_array_equal(np.asarray(got["sq"]), 1.0)


def test_rules_follow_matrix_axes():
    # an attention kernel (embed=16, heads=4, head_dim=16) is one 16 x 64 matrix
    u = {"qkv": jnp.ones((16, 4, 16))}
    axes = lambda path, leaf: muonjax.MatrixAxes(rows=0, cols=(1, 2))
    got, _ = muonjax.scale_by_shape(rule="jordan", matrix_axes=axes).update(u, optax.EmptyState())
    np.testing.assert_array_equal(np.asarray(got["qkv"]), 2.0)


def test_construction_errors():
    with pytest.raises(ValueError, match="'spectral'.*moonlight, hidden, update_norm, jordan"):
        muonjax.scale_by_shape(rule="spectral")
    with pytest.raises(ValueError, match="'spectral'"):
        muonjax.muon(1e-3, update_scale="spectral")
    with pytest.raises(ValueError, match="'spectral'"):
        muonjax.moonlight(1e-3, update_scale="spectral")
    with pytest.raises(ValueError, match="hidden_size"):
        muonjax.scale_by_shape(rule="hidden")
    with pytest.raises(ValueError, match="hidden_size"):
        muonjax.moonlight(1e-3, update_scale="hidden")
    with pytest.raises(ValueError, match="hidden_size must be at least 1, got 0"):
        muonjax.muon(1e-3, update_scale="hidden", hidden_size=0)


def test_update_scale_under_inject_hyperparams():
    params = _tree({"w": (16, 24)}, seed=0)
    tx = optax.inject_hyperparams(muonjax.muon, static_args=("ns_steps",))(
        learning_rate=1.0, weight_decay=0.0, update_scale="update_norm", rms_scale=0.3
    )
    updates, _ = jax.jit(tx.update)(_tree({"w": (16, 24)}, seed=1), tx.init(params), params)
    np.testing.assert_allclose(_rms_per_matrix(updates["w"]), 0.3, rtol=1e-5)


def _model_params():
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return {
        "embed": {"embedding": normal(40, 16)},
        "layers": {
            "attn": {"kernel": normal(2, 16, 16)},
            "mlp": {"kernel": normal(2, 16, 24), "bias": normal(2, 24)},
            "norm": {"scale": normal(2, 16)},
        },
        "final_norm": {"scale": normal(16)},
        "lm_head": {"kernel": normal(16, 40)},
    }


def _one_step_with_zero_grads(tx, params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    return optax.apply_updates(params, updates)


def test_decay_norms_and_biases_false_leaves_norms_and_biases_alone():
    lr, wd = 0.1, 0.2
    params = _model_params()
    got = _one_step_with_zero_grads(
        muonjax.moonlight(lr, weight_decay=wd, decay_norms_and_biases=False), params
    )
    np.testing.assert_array_equal(got["final_norm"]["scale"], params["final_norm"]["scale"])
    for group, name in (("norm", "scale"), ("mlp", "bias")):  # scanned (layers, D)
        np.testing.assert_array_equal(got["layers"][group][name], params["layers"][group][name])
    for path in (("embed", "embedding"), ("lm_head", "kernel")):  # AdamW, 2-D: decays
        np.testing.assert_allclose(
            got[path[0]][path[1]], params[path[0]][path[1]] * (1 - lr * wd), rtol=1e-6
        )
    np.testing.assert_allclose(  # Muon: decays as before
        got["layers"]["attn"]["kernel"],
        params["layers"]["attn"]["kernel"] * (1 - lr * wd),
        rtol=1e-6,
    )
    default = _one_step_with_zero_grads(muonjax.moonlight(lr, weight_decay=wd), params)
    np.testing.assert_allclose(
        default["final_norm"]["scale"], params["final_norm"]["scale"] * (1 - lr * wd), rtol=1e-6
    )


def test_weight_decay_mask_on_nnx_state_paths():
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(8, 4, rngs=rngs)
            self.proj = nnx.Linear(4, 4, rngs=rngs)
            self.norm = nnx.RMSNorm(4, rngs=rngs)

    flat = {
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_leaves_with_path(
            muonjax.weight_decay_mask(nnx.state(Model(nnx.Rngs(0)), nnx.Param))
        )
    }
    assert flat == {
        "['embed']['embedding'].value": True,
        "['proj']['kernel'].value": True,
        "['proj']['bias'].value": False,
        "['norm']['scale'].value": False,
    }


def test_adamw_weight_decay_applies_to_the_adamw_group_only():
    lr, wd, adamw_wd = 0.1, 0.2, 0.05
    params = _model_params()
    got = _one_step_with_zero_grads(
        muonjax.moonlight(lr, weight_decay=wd, adamw_weight_decay=adamw_wd), params
    )
    for group, name, decay in (
        ("embed", "embedding", adamw_wd),
        ("lm_head", "kernel", adamw_wd),
        ("final_norm", "scale", adamw_wd),
    ):
        np.testing.assert_allclose(
            got[group][name], params[group][name] * (1 - lr * decay), rtol=1e-6
        )
    for name in ("attn", "mlp"):
        np.testing.assert_allclose(
            got["layers"][name]["kernel"],
            params["layers"][name]["kernel"] * (1 - lr * wd),
            rtol=1e-6,
        )


def test_moonlight_compute_dtype_bfloat16_is_close_to_float32():
    params = _model_params()
    grads = jax.tree.map(lambda p: jnp.sin(3 * p), params)
    out = {}
    for dtype in ("float32", "bfloat16"):
        tx = muonjax.moonlight(0.01, compute_dtype=dtype)
        out[dtype], _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for name in ("attn", "mlp"):
        half = out["bfloat16"]["layers"][name]["kernel"]
        full = out["float32"]["layers"][name]["kernel"]
        assert half.dtype == jnp.float32
        # bfloat16 rounding moves the Newton-Schulz iterates by a few percent
        # (see test_newton_schulz), so "close" here means within 10%.
        rel = float(jnp.linalg.norm(half - full) / jnp.linalg.norm(full))
        assert 0 < rel < 0.1, (name, rel)
    np.testing.assert_array_equal(  # the AdamW group does not use compute_dtype
        out["bfloat16"]["embed"]["embedding"], out["float32"]["embed"]["embedding"]
    )
