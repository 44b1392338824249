"""muon / scale_by_muon / scale_by_shape against the float64 reference and optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import muon_step

import muonjax

SHAPES = {"square": (32, 32), "wide": (16, 48), "tall": (48, 16), "experts": (4, 16, 24)}


def _tree(shapes, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _run(tx, params, grads_seq):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads_seq:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_float64_paper_equations(nesterov, wd):
    lr, steps = 0.02, 4
    params = _tree(SHAPES, seed=0)
    grads = [_tree(SHAPES, seed=1 + t) for t in range(steps)]
    tx = muonjax.muon(lr, weight_decay=wd, nesterov=nesterov)
    got, _ = _run(tx, params, grads)
    for name in SHAPES:
        w, m = params[name], np.zeros_like(params[name], np.float64)
        for g in grads:
            w, m = muon_step(w, g[name], m, lr=lr, wd=wd, nesterov=nesterov)
        change_ref = w - params[name]
        change = np.asarray(got[name], np.float64) - params[name]
        rel = np.linalg.norm(change - change_ref) / np.linalg.norm(change_ref)
        assert rel < 1e-3, (name, rel)


@pytest.mark.parametrize("shape", [(1, 24), (24, 1), (2, 3, 8, 12)])
def test_matches_reference_on_vectors_and_4d_stacks(shape):
    params = {"w": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    grads = [
        {"w": np.random.default_rng(t + 1).standard_normal(shape).astype(np.float32)}
        for t in range(3)
    ]
    got, _ = _run(muonjax.muon(0.05), params, grads)
    w, m = params["w"], np.zeros(shape)
    for g in grads:
        w, m = muon_step(w, g["w"], m, lr=0.05, wd=0.1)
    np.testing.assert_allclose(got["w"], w, atol=1e-5)


def test_rank_one_update_rms_is_the_quintic_image_of_one():
    # A 1 x N matrix has one singular value, exactly 1 after normalization;
    # Jordan's quintic does not converge to 1 but lands near 0.7 there, so
    # the update RMS is 0.2 * p(p(p(p(p(1))))) rather than 0.2.
    s = 1.0
    for _ in range(5):
        s = 3.4445 * s - 4.7750 * s**3 + 2.0315 * s**5
    g = {"w": jax.random.normal(jax.random.key(0), (1, 128))}
    updates, _ = muonjax.muon(1.0, weight_decay=0.0).update(g, muonjax.muon(1.0).init(g), g)
    rms = float(jnp.sqrt(jnp.mean(jnp.square(updates["w"]))))
    np.testing.assert_allclose(rms, 0.2 * s, rtol=1e-4)


def test_matches_optax_contrib_where_semantics_coincide():
    # optax.contrib.muon keeps a bias-corrected EMA; without Nesterov it is a
    # positive multiple of our momentum sum, which Newton-Schulz normalizes away.
    shapes = {"a": (32, 32), "b": (16, 48), "c": (48, 16)}
    params = _tree(shapes, seed=0)
    grads = [_tree(shapes, seed=10 + t) for t in range(4)]
    ours = muonjax.muon(0.01, weight_decay=0.1, nesterov=False, eps=1e-8)
    theirs = optax.contrib.muon(
        0.01, weight_decay=0.1, nesterov=False, consistent_rms=0.2, eps=1e-8
    )
    got, _ = _run(ours, params, grads)
    expected, _ = _run(theirs, params, grads)
    for k in shapes:
        np.testing.assert_allclose(got[k], expected[k], atol=2e-6)


@pytest.mark.parametrize(
    "shape", [(64, 64), (32, 256), (256, 32), (8, 64, 96), (4, 128), (2, 2, 48, 40)]
)
def test_update_rms_is_about_rms_scale_whatever_the_shape(shape):
    params = {"w": jnp.zeros(shape)}
    tx = muonjax.muon(1.0, weight_decay=0.0)
    state = tx.init(params)
    key = jax.random.key(0)
    for t in range(5):
        g = {"w": jax.random.normal(jax.random.fold_in(key, t), shape)}
        updates, state = tx.update(g, state, params)
    rms = float(jnp.sqrt(jnp.mean(jnp.square(updates["w"]))))
    assert 0.15 <= rms <= 0.22, rms


def test_scale_by_shape_multiplies_by_rms_scale_sqrt_max_side():
    updates = {"a": jnp.ones((4, 9)), "b": jnp.ones((3, 25, 16))}
    scaled, _ = muonjax.scale_by_shape(rms_scale=0.5).update(updates, optax.EmptyState())
    np.testing.assert_allclose(scaled["a"], 0.5 * 3.0)
    np.testing.assert_allclose(scaled["b"], 0.5 * 5.0)


def test_zero_gradient_gives_decay_only_update():
    params = _tree(SHAPES, seed=3)
    tx = muonjax.muon(0.1, weight_decay=0.2)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for k in params:
        assert np.all(np.isfinite(updates[k]))
        np.testing.assert_allclose(updates[k], -0.1 * 0.2 * params[k], rtol=1e-6)


def test_nan_gradient_is_skipped_with_apply_if_finite():
    # The optax way: wrap in apply_if_finite, which drops a non-finite update
    # (params and momentum unchanged) and counts it.
    params = _tree({"w": (8, 12)}, seed=4)
    tx = optax.apply_if_finite(muonjax.muon(0.1), max_consecutive_errors=3)
    state = tx.init(params)
    bad = {"w": jnp.full((8, 12), jnp.nan)}
    updates, state = jax.jit(tx.update)(bad, state, params)
    assert np.all(np.asarray(updates["w"]) == 0)
    assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
    assert np.all(np.asarray(state.inner_state[0].mu["w"]) == 0)
    good = _tree({"w": (8, 12)}, seed=5)
    updates, state = jax.jit(tx.update)(good, state, params)
    assert np.all(np.isfinite(updates["w"])) and np.any(updates["w"] != 0)
    assert int(state.notfinite_count) == 0


def test_bfloat16_params_with_float32_momentum():
    shapes = {"w": (32, 48), "experts": (4, 16, 24)}
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.bfloat16), _tree(shapes, seed=6))
    grads = [
        jax.tree.map(lambda g: jnp.asarray(g, jnp.bfloat16), _tree(shapes, seed=20 + t))
        for t in range(3)
    ]
    tx = muonjax.muon(0.02, mu_dtype=jnp.float32)
    state = tx.init(params)
    for g in grads:
        updates, state = jax.jit(tx.update)(g, state, params)
    # the same steps in float32 from the same (bf16-valued) params and grads
    up32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
    tx32 = muonjax.muon(0.02)
    state32 = tx32.init(up32(params))
    for g in grads:
        updates32, state32 = tx32.update(up32(g), state32, up32(params))
    for k in shapes:
        momentum = state[0].mu[k]
        assert momentum.dtype == jnp.float32
        # accumulated in float32: M = g3 + 0.95 g2 + 0.95^2 g1, nothing rounded to bf16
        np.testing.assert_allclose(momentum, state32[0].mu[k], atol=1e-6)
        assert updates[k].dtype == jnp.bfloat16
        u16, u32 = np.asarray(updates[k], np.float32), np.asarray(updates32[k])
        # a few bf16 roundings (direction, shape scale, decay, lr) of 2^-9 each
        assert np.linalg.norm(u16 - u32) <= 2**-7 * np.linalg.norm(u32)
    new = optax.apply_updates(params, updates)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(new))


def test_momentum_dtype_defaults_to_params():
    params = {"w": jnp.zeros((4, 6), jnp.bfloat16)}
    state = muonjax.scale_by_muon().init(params)
    assert state.mu["w"].dtype == jnp.bfloat16
    updates, state = muonjax.scale_by_muon().update({"w": jnp.ones((4, 6), jnp.bfloat16)}, state)
    assert updates["w"].dtype == jnp.bfloat16 and state.mu["w"].dtype == jnp.bfloat16


def test_learning_rate_schedule():
    params = _tree({"w": (8, 8)}, seed=7)
    g = _tree({"w": (8, 8)}, seed=8)
    schedule = optax.linear_schedule(1.0, 0.0, transition_steps=2)
    tx = muonjax.muon(schedule, weight_decay=0.0)
    const = muonjax.muon(1.0, weight_decay=0.0)
    state, cstate = tx.init(params), const.init(params)
    first, state = tx.update(g, state, params)
    ref, _ = const.update(g, cstate, params)
    np.testing.assert_allclose(first["w"], ref["w"], rtol=1e-6)
    _second, state = tx.update(g, state, params)
    third, state = tx.update(g, state, params)
    assert np.all(np.asarray(third["w"]) == 0)  # lr reached 0 at step 2


def test_inject_hyperparams():
    params = _tree({"w": (8, 8)}, seed=9)
    g = _tree({"w": (8, 8)}, seed=10)
    tx = optax.inject_hyperparams(muonjax.muon, static_args=("ns_steps",))(
        learning_rate=0.1, weight_decay=0.0
    )
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(g, state, params)
    ref, _ = muonjax.muon(0.1, weight_decay=0.0).update(g, muonjax.muon(0.1).init(params), params)
    np.testing.assert_allclose(updates["w"], ref["w"], atol=1e-7)
    state.hyperparams["learning_rate"] = jnp.asarray(0.05)
    state.hyperparams["momentum"] = jnp.asarray(0.0)
    halved, _ = jax.jit(tx.update)(g, state, params)
    # momentum 0: the direction is that of g alone, at half the step
    fresh, _ = muonjax.muon(0.05, weight_decay=0.0, momentum=0.0).update(
        g, muonjax.muon(0.05).init(params), params
    )
    np.testing.assert_allclose(halved["w"], fresh["w"], atol=1e-7)


def test_inject_hyperparams_needs_static_ns_steps_only_when_given():
    params = {"w": jnp.zeros((4, 4))}
    optax.inject_hyperparams(muonjax.muon)(learning_rate=0.1).init(params)  # default: None
    tx = optax.inject_hyperparams(muonjax.muon)(learning_rate=0.1, ns_steps=3)
    with pytest.raises(TypeError, match="static_args=\\('ns_steps',\\)"):
        tx.init(params)
    static = optax.inject_hyperparams(muonjax.muon, static_args=("ns_steps",))
    static(learning_rate=0.1, ns_steps=3).init(params)


def test_vector_leaf_is_a_clear_error():
    tx = muonjax.muon(0.1)
    with pytest.raises(ValueError, match=r"\['norm'\]\['scale'\].*shape \(8,\).*moonlight"):
        tx.init({"norm": {"scale": jnp.ones(8)}, "w": jnp.ones((8, 8))})


def test_matrix_axes_reads_a_3d_kernel_as_one_matrix():
    # (embed, heads, head_dim) stored kernel == one (embed, heads*head_dim) matrix,
    # stacked over a leading layer axis
    shape3, shape2 = (2, 16, 4, 6), (2, 16, 24)
    rng = np.random.default_rng(11)
    p3 = {"qkv": rng.standard_normal(shape3).astype(np.float32)}
    g3 = [{"qkv": rng.standard_normal(shape3).astype(np.float32)} for _ in range(3)]
    axes = lambda path, leaf: muonjax.MatrixAxes(rows=1, cols=(2, 3))
    got, _ = _run(muonjax.muon(0.05, matrix_axes=axes), p3, g3)
    flat = lambda t: {"qkv": t["qkv"].reshape(shape2)}
    expected, _ = _run(muonjax.muon(0.05), flat(p3), [flat(g) for g in g3])
    np.testing.assert_allclose(got["qkv"].reshape(shape2), expected["qkv"], atol=1e-6)


def test_matrix_axes_with_transposed_layout():
    # (out, stack, in): rows=in (axis 2), cols=out (axis 0), axis 1 a stack
    rng = np.random.default_rng(12)
    p = {"w": rng.standard_normal((12, 3, 20)).astype(np.float32)}
    g = [{"w": rng.standard_normal((12, 3, 20)).astype(np.float32)} for _ in range(2)]
    axes = lambda path, leaf: muonjax.MatrixAxes(rows=2, cols=0)
    got, _ = _run(muonjax.muon(0.05, matrix_axes=axes), p, g)
    canon = lambda t: {"w": np.transpose(t["w"], (1, 2, 0))}  # (stack, in, out)
    expected, _ = _run(muonjax.muon(0.05), canon(p), [canon(x) for x in g])
    np.testing.assert_allclose(canon(got)["w"], expected["w"], atol=1e-6)


def test_bad_matrix_axes_is_a_clear_error():
    axes = lambda path, leaf: muonjax.MatrixAxes(rows=0, cols=0)
    with pytest.raises(ValueError, match="distinct, non-empty"):
        muonjax.muon(0.1, matrix_axes=axes).init({"w": jnp.ones((4, 4))})


@pytest.mark.parametrize(
    "name, old, new",
    [
        ("learning_rate", 0.1, 0.05),
        ("weight_decay", 0.1, 0.5),
        ("momentum", 0.9, 0.5),
        ("rms_scale", 0.2, 0.4),
        ("eps", 1e-7, 10.0),
    ],
)
def test_every_hyperparameter_can_be_read_and_set_by_name(name, old, new):
    # optax.inject_hyperparams puts them in the state; the momentum buffer is
    # `mu` (as in optax), so `tree_get(state, "momentum")` is the hyperparameter
    tx = optax.inject_hyperparams(muonjax.muon)(**{"learning_rate": 0.1, name: old})
    params, g = _tree({"w": (8, 12)}, seed=9), _tree({"w": (8, 12)}, seed=10)
    step = jax.jit(tx.update)
    _, state = step(_tree({"w": (8, 12)}, seed=11), tx.init(params), params)
    assert float(optax.tree_utils.tree_get(state, name)) == pytest.approx(old)
    changed = optax.tree_utils.tree_set(state, **{name: new})
    assert float(optax.tree_utils.tree_get(changed, name)) == pytest.approx(new)
    assert optax.tree_utils.tree_get(changed, "mu")["w"].shape == (8, 12)  # buffer untouched
    before, _ = step(g, state, params)
    after, _ = step(g, changed, params)
    assert float(jnp.max(jnp.abs(after["w"] - before["w"]))) > 1e-6, name


def test_matrix_axes_out_of_range_is_a_clear_error():
    # rows=5 on a 3-D leaf used to wrap silently to axis 2
    axes = lambda path, leaf: muonjax.MatrixAxes(rows=5, cols=1)
    with pytest.raises(ValueError, match=r"\['stack'\]\['w'\].*\(2, 3, 4\).*\(5,\).*-3 to 2"):
        muonjax.muon(0.1, matrix_axes=axes).init({"stack": {"w": jnp.ones((2, 3, 4))}})
    axes = lambda path, leaf: muonjax.MatrixAxes(rows=(-4, -2), cols=-1)
    with pytest.raises(ValueError, match=r"\['w'\].*\(-4,\)"):
        muonjax.scale_by_muon(matrix_axes=axes).init({"w": jnp.ones((2, 3, 4))})


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.int32])
def test_non_real_floating_leaf_is_a_clear_error(dtype):
    params = {"a": jnp.ones((4, 4)), "w": jnp.ones((4, 4), dtype)}
    with pytest.raises(ValueError, match=r"real floating.*\['w'\]"):
        muonjax.muon(0.1).init(params)
    # and in update, where a complex gradient would lose its imaginary part
    tx = muonjax.scale_by_shape()
    with pytest.raises(ValueError, match=r"real floating.*\['w'\]"):
        tx.update(params, tx.init(params))
