"""ZeRO-1 for users' own models: state shardings over a named mesh axis, and
docs/optimizer.md's sharded-model example, run as written."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import muonjax

README = pathlib.Path(__file__).resolve().parent.parent / "docs" / "optimizer.md"


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4, 2), ("dp", "model"), axis_types=(AxisType.Auto,) * 2)


def test_zero1_sharding_prefers_a_stack_then_the_longest_matrix_axis(mesh):
    s = lambda *spec: NamedSharding(mesh, P(*spec))
    assert muonjax.zero1_sharding(s(None, None, "model"), (8, 64, 32), "dp").spec == P(
        "dp", None, "model"
    )
    # a stack of 6 that 4 does not divide: the longest matrix axis, after its own split
    assert muonjax.zero1_sharding(s(None, None, "model"), (6, 64, 32), "dp").spec == P(
        None, "dp", "model"
    )
    assert muonjax.zero1_sharding(s(None, "model"), (32, 64), "dp").spec == P(None, ("model", "dp"))
    # nothing divisible: unchanged (replicated over dp); already using dp: unchanged
    assert muonjax.zero1_sharding(s(), (3, 5), "dp").spec == P()
    assert muonjax.zero1_sharding(s("dp"), (8, 8), "dp").spec == P("dp")
    with pytest.raises(ValueError, match="'data' is not one of the mesh's axes"):
        muonjax.zero1_sharding(s(), (8, 8), "data")


def test_state_shardings_split_every_moment_and_replicate_the_rest(mesh):
    params = {"embed": jnp.ones((64, 16)), "w": jnp.ones((4, 16, 32)), "norm": jnp.ones((16,))}
    param_sh = {
        "embed": NamedSharding(mesh, P(None, "model")),
        "w": NamedSharding(mesh, P(None, None, "model")),
        "norm": NamedSharding(mesh, P()),
    }
    tx = optax.inject_hyperparams(muonjax.moonlight)(learning_rate=1e-3)
    shardings = muonjax.zero1_state_shardings(tx, params, param_sh, "dp")
    state = jax.jit(tx.init, out_shardings=shardings)(jax.device_put(params, param_sh))
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        name = jax.tree_util.keystr(path)
        if leaf.ndim == 0:  # step counts and injected hyperparameters
            assert leaf.sharding.is_fully_replicated, name
        else:  # every moment: 1/4 per data-parallel rank (model splits it further)
            assert leaf.addressable_shards[0].data.size * 4 <= leaf.size, name
    assert optax.tree_utils.tree_get(state, "learning_rate") == pytest.approx(1e-3)


def test_readme_sharded_model_example_runs_and_equals_one_device():
    """docs/optimizer.md's example as written, against the same step on one device."""
    block = next(
        b
        for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
        if "zero1_state_shardings" in b
    )
    assert len([line for line in block.splitlines() if line.strip()]) < 20
    sharded = {}
    exec(block, sharded)
    # the same model, data and optimizer step without any mesh
    plain = {}
    exec(
        block.replace("jax.device_put(", "(lambda x, *_: x)(")
        .replace("with jax.set_mesh(mesh):", "if True:")
        .replace("out_shardings=state_sh", ""),
        plain,
    )
    for a, b in zip(jax.tree.leaves(sharded["params"]), jax.tree.leaves(plain["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert not np.allclose(np.asarray(sharded["params"]["w"]), np.stack([np.eye(64)] * 8))
    for leaf in jax.tree.leaves(sharded["opt_state"]):
        if leaf.ndim:
            assert "data" in str(leaf.sharding.spec), leaf.sharding
