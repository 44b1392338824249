"""Distributed Muon by ownership: sharded updates equal unsharded ones, on
Auto and Explicit mesh axes, with whole matrices spread over the devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import muonjax
from muonjax.optim.distributed import plan_buckets, spread_flops
from muonjax.parallel import hlo


def _tree(seed=0):
    """2-D kernels, stacks that 8 does and does not divide, a tall matrix and
    a leaf read through MatrixAxes (embed, heads, head_dim)."""
    shapes = {
        "a": (64, 32),
        "b": (32, 96),
        "stack8": (8, 16, 24),
        "stack3": (3, 24, 16),
        "heads": (16, 4, 8),
    }
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return {k: jax.random.normal(key, s) for key, (k, s) in zip(keys, shapes.items())}


SPECS = {
    "a": P("d", None),
    "b": P(None, "d"),
    "stack8": P("d", None, None),
    "stack3": P(None, "d", None),
    "heads": P("d", None, None),
}


def _matrix_axes(path, leaf):
    if jax.tree_util.keystr(path) == "['heads']":
        return muonjax.MatrixAxes(rows=0, cols=(1, 2))
    return None


def _two_steps(tx, params, grads):
    state = tx.init(params)
    first, state = tx.update(grads, state, params)
    second, _ = tx.update(jax.tree.map(lambda g: -0.5 * g, grads), state, params)
    return first, second


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_update_equals_unsharded(axis_type):
    params, grads = _tree(0), _tree(1)
    tx = muonjax.muon(0.1, matrix_axes=_matrix_axes)
    want = _two_steps(tx, params, grads)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
    with jax.set_mesh(mesh):
        shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
        got = jax.jit(lambda p, g: _two_steps(tx, p, g))(
            jax.device_put(params, shardings), jax.device_put(grads, shardings)
        )
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    for name, update in got[1].items():  # returned in the updates' own layout
        assert update.sharding.is_equivalent_to(shardings[name], update.ndim), name


def test_mesh_argument_spreads_without_set_mesh():
    params, grads = _tree(0), _tree(1)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
    shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
    spread = muonjax.muon(0.1, matrix_axes=_matrix_axes, mesh=mesh)
    want = _two_steps(muonjax.muon(0.1, matrix_axes=_matrix_axes), params, grads)
    update = jax.jit(lambda p, g: _two_steps(spread, p, g))
    args = jax.device_put(params, shardings), jax.device_put(grads, shardings)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(update(*args))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    # the matrices reach their owners and come back: all-to-alls, no all-gather
    compiled = update.lower(*args).compile().as_text()
    counts = hlo.collective_bytes(compiled, 8)["instructions"]
    assert counts["all-gather"] == 0 and counts["all-to-all"] > 0, counts


def test_moonlight_under_explicit_axes():
    params = {"embed": jnp.ones((32, 16)), "w": _tree(0)["a"], "norm": jnp.ones((16,))}
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size).reshape(p.shape) * 1.0), params)
    tx = muonjax.moonlight(0.1)
    want, _ = tx.update(grads, tx.init(params), params)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        specs = {"embed": P("d", None), "w": P(None, "d"), "norm": P()}
        put = lambda t: jax.device_put(t, {k: NamedSharding(mesh, s) for k, s in specs.items()})
        p, g = put(params), put(grads)
        got, _ = jax.jit(tx.update)(g, jax.jit(tx.init)(p), p)
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-4, atol=1e-5)


def test_zero_padding_is_exact():
    """Newton-Schulz of [[N, 0], [0, 0]] is [[O, 0], [0, 0]]: why buckets may pad."""
    x = jax.random.normal(jax.random.PRNGKey(3), (12, 20))
    padded = jnp.zeros((16, 32)).at[:12, :20].set(x)
    o = muonjax.orthogonalize(padded)
    np.testing.assert_allclose(o[:12, :20], muonjax.orthogonalize(x), atol=1e-6)
    assert float(jnp.max(jnp.abs(o[12:]))) == 0 and float(jnp.max(jnp.abs(o[:, 20:]))) == 0


def test_buckets_cover_every_matrix_and_balance_work():
    groups = [(16, 1024, 1024), (3, 512, 256), (26, 256, 512), (1, 64, 8)]
    for devices in (1, 8, 64):
        buckets = plan_buckets(groups, devices)
        assert sorted(i for b in buckets for i in b.members) == [0, 1, 2, 3]
        for b in buckets:
            assert b.slots % devices == 0
            assert b.slots >= sum(groups[i][0] for i in b.members)
            for i in b.members:  # zero-padded into the bucket's shape
                assert groups[i][1] <= b.shape[0] and groups[i][2] <= b.shape[1]
    total = sum(muonjax.newton_schulz_flops(g) for g in groups)
    assert spread_flops(groups, 1) == total  # one device: nothing padded
    assert spread_flops(groups, 8) <= 1.15 * total / 8
    # 16 matrices over 8 devices: two each, exactly
    assert spread_flops([(16, 1024, 1024)], 8) == muonjax.newton_schulz_flops((2, 1024, 1024))
    assert spread_flops([(1024, 1024)] * 16, 8) == muonjax.newton_schulz_flops((2, 1024, 1024))


def test_known_layouts_keep_split_stacks_and_equal_unsharded():
    """update_specs under Auto axes: experts split over `expert` stay there
    (the rest spread over `data` within each expert group), a stack 8 divides
    is orthogonalized in place, a matrix split over data is packed."""
    mesh = jax.make_mesh((4, 2), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
    specs = {
        "experts": P(None, "expert", "data", None),  # (layers, experts, D, F)
        "layers": P("data", None, None),
        "attn": P(None, "data"),
    }
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    shapes = {"experts": (3, 4, 16, 24), "layers": (8, 24, 16), "attn": (16, 40)}
    params = {k: jax.random.normal(key, shapes[k]) for key, k in zip(keys, shapes)}
    grads = jax.tree.map(lambda p: jnp.sin(3 * p), params)
    spec_of = lambda path, leaf: specs[path[-1].key]
    tx = muonjax.muon(0.1, mesh=mesh, update_specs=spec_of)
    want = _two_steps(muonjax.muon(0.1), params, grads)
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    args = jax.device_put(params, shardings), jax.device_put(grads, shardings)
    got = jax.jit(lambda p, g: _two_steps(tx, p, g))(*args)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    # packed matrices reach their owners by all-to-alls
    compiled = jax.jit(lambda p, g: _two_steps(tx, p, g)).lower(*args).compile().as_text()
    assert "all-to-all" in compiled
    planned = spread_flops(
        [shapes[k] for k in specs], dict(mesh.shape), specs=[specs[k] for k in specs]
    )
    # busiest device: 2 of its expert group's 6 expert matrices (over 4 data
    # ranks), 1 of the 8 layers, and the one attention matrix's slot
    flops = muonjax.newton_schulz_flops
    assert planned == 2 * flops((16, 24)) + flops((24, 16)) + flops((16, 40))
