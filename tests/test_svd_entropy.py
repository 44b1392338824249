"""SVD entropy (paper Sec. 3.4, Figure 4): the function against a float64
reference of the paper's formula, the paper's groups over the model's hidden
matrices, the trainer's --svd-entropy-every metric, and its validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import muonjax.models
from muonjax.models import (
    FIGURE4_GROUPS,
    ModelConfig,
    Transformer,
    svd_entropies,
    svd_entropy,
    svd_entropy_by_group,
)
from muonjax.models.spectra import figure4_group, hidden_matrices, matrix_group
from muonjax.optim.paths import path_names
from muonjax.train import ConfigError, TrainConfig, config_from_args, read_metrics, run


def reference(matrix) -> float:
    """H = -1/log(n) sum p_i log p_i, p_i = s_i^2 / sum_j s_j^2, n = min(rows, cols), in float64."""
    s = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
    p = s**2 / np.sum(s**2)
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)) / np.log(min(np.shape(matrix))))


@pytest.mark.parametrize("shape", [(8, 8), (16, 5), (5, 16), (64, 8)])
def test_matches_the_papers_formula(shape):
    matrix = np.random.default_rng(0).normal(size=shape)
    h = svd_entropy(jnp.asarray(matrix, jnp.float32))
    assert h.shape == () and h.dtype == jnp.float32
    np.testing.assert_allclose(h, reference(matrix), atol=1e-5)


def test_a_stack_gives_one_entropy_per_matrix():
    rng = np.random.default_rng(1)
    # columns of different scales, so the entropies differ from matrix to matrix
    stack = rng.normal(size=(3, 4, 12, 6)) * rng.uniform(0.01, 1, size=(3, 4, 1, 6))
    h = svd_entropy(jnp.asarray(stack, jnp.float32))
    assert h.shape == (3, 4)
    expected = [[reference(m) for m in layer] for layer in stack]
    np.testing.assert_allclose(h, expected, atol=1e-5)


def test_exact_values_and_edge_cases():
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(32, 32)))
    np.testing.assert_allclose(svd_entropy(jnp.asarray(q, jnp.float32)), 1.0, atol=1e-5)
    wide = q[:8]  # orthonormal rows: all 8 singular values 1
    np.testing.assert_allclose(svd_entropy(jnp.asarray(wide, jnp.float32)), 1.0, atol=1e-5)
    rank1 = np.outer(np.arange(1.0, 9.0), np.linspace(-1, 1, 5))
    np.testing.assert_allclose(svd_entropy(jnp.asarray(rank1, jnp.float32)), 0.0, atol=1e-5)
    # rank 2 of 6: zero singular values add nothing (0 log 0 = 0)
    low = np.random.default_rng(3).normal(size=(10, 2)) @ np.random.default_rng(4).normal(
        size=(2, 6)
    )
    np.testing.assert_allclose(
        svd_entropy(jnp.asarray(low, jnp.float32)), reference(low), atol=1e-5
    )
    assert float(svd_entropy(jnp.zeros((4, 5)))) == 0.0
    # scale-free, even where s^2 would overflow float32
    x = np.random.default_rng(5).normal(size=(6, 9)).astype(np.float32)
    for scale in (1e-20, 1e25):
        np.testing.assert_allclose(svd_entropy(x * scale), svd_entropy(x), atol=1e-5)
    assert svd_entropy(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.float32
    with pytest.raises(ValueError, match="at least 2 rows and 2 columns, got shape"):
        svd_entropy(jnp.ones((5, 1)))
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        svd_entropy(jnp.ones((5,)))
    assert muonjax.models.svd_entropy is svd_entropy


def test_float64_in_float64():
    matrix = np.random.default_rng(6).normal(size=(7, 11))
    with jax.enable_x64(True):
        h = svd_entropy(jnp.asarray(matrix))
        assert h.dtype == jnp.float64
        np.testing.assert_allclose(h, reference(matrix), rtol=1e-12)


@pytest.mark.parametrize(
    "changes, groups",
    [
        ({}, {"q_proj": "AttnQO", "kv_a_proj": "AttnKV", "kv_b_proj": "AttnKV"}),
        ({"q_lora_rank": 24}, {"q_a_proj": "AttnQO", "q_b_proj": "AttnQO", "kv_b_proj": "AttnKV"}),
        ({"attention": "mha"}, {"q_proj": "AttnQO", "k_proj": "AttnKV", "v_proj": "AttnKV"}),
    ],
)
@pytest.mark.slow
def test_every_hidden_matrix_has_its_figure4_group(changes, groups):
    config = ModelConfig(n_layers=3, first_k_dense=1, **changes)
    params = nnx.state(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
    labels = jax.tree.leaves(muonjax.moonlight_labels(params))
    placed = {path_names(p): g for p, g, _ in hidden_matrices(params)}
    assert len(placed) == labels.count("muon")  # every matrix Muon orthogonalizes
    by_module = {names[-2]: figure4_group(names) for names in placed}
    assert by_module["o_proj"] == "AttnQO" and by_module["router"] == "Router"
    assert {k: by_module[k] for k in groups} == groups
    assert figure4_group(("moe_layers", "moe", "experts", "gate")) == "Experts"
    assert figure4_group(("moe_layers", "moe", "shared", "up", "kernel")) == "SharedExperts"
    assert figure4_group(("dense_layers", "mlp", "down", "kernel")) == "Dense"
    # Table 1's finer groups (experiments/update_rms.py) keep query and output apart
    assert matrix_group(("dense_layers", "attn", "o_proj", "kernel")) == "AttnO"

    # one entropy per layer of a stack and per expert; the group mean over those
    per_leaf = jax.jit(svd_entropies)(params)
    assert per_leaf["moe_layers/moe/experts/gate"].shape == (2, config.n_routed_experts)
    assert per_leaf["moe_layers/moe/router/kernel"].shape == (2,)
    assert per_leaf["dense_layers/mlp/up/kernel"].shape == (1,)
    means = jax.jit(svd_entropy_by_group)(params)
    assert set(means) == set(FIGURE4_GROUPS)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for group in FIGURE4_GROUPS:
        expected = [
            reference(m)
            for path, leaf in flat
            if path_names(path) in placed and figure4_group(path_names(path)) == group
            for m in np.asarray(leaf).reshape(-1, *leaf.shape[-2:])
        ]
        np.testing.assert_allclose(means[group], np.mean(expected), atol=1e-5, err_msg=group)


def test_leaves_are_read_as_muon_reads_them():
    """A (D, heads, head_dim) kernel is one (D, heads * head_dim) matrix when
    Muon's matrix_axes says so; the metric takes the same view."""
    kernel = np.random.default_rng(7).normal(size=(2, 8, 2, 4)).astype(np.float32)  # layers first
    params = {"layers": {"attn": {"q_proj": {"kernel": kernel}}}}
    axes = lambda path, leaf: muonjax.MatrixAxes(rows=(-3,), cols=(-2, -1))
    h = svd_entropies(params, axes)["layers/attn/q_proj/kernel"]
    np.testing.assert_allclose(h, [reference(k.reshape(8, 8)) for k in kernel], atol=1e-5)
    default = svd_entropies(params)["layers/attn/q_proj/kernel"]
    assert default.shape == (2, 8)  # without it: a stack of (2, 4) matrices


@pytest.mark.slow
def test_many_cpu_devices_do_not_deadlock():
    """jaxlib's batched CPU SVD waits on XLA's thread pool from inside it: the
    8 devices' programs, each with several SVDs, used to hang here for good."""
    config = ModelConfig(
        d_model=32, intermediate_size=64, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, moe_intermediate_size=16,
    )  # fmt: skip
    params = nnx.state(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    by_group = jax.jit(svd_entropy_by_group)
    first = jax.device_get(by_group(params))
    for _ in range(30):
        assert jax.device_get(by_group(params)) == first


@pytest.mark.slow
def test_trainer_logs_svd_entropy_on_a_sharded_model(corpus, tmp_path):
    import orbax.checkpoint as ocp

    config = TrainConfig(
        out=str(tmp_path / "run"), data=(corpus,), steps=6, batch_size=8, seq_len=32,
        log_every=3, eval_every=6, checkpoint_every=6, warmup_steps=1, progress=False,
        svd_entropy_every=4, mesh="data=4,expert=2",  # experts split over 2 devices
    )  # fmt: skip
    run(config, log=lambda *_: None)
    lines = [r for r in read_metrics(config.out) if any(k.startswith("svd_entropy_") for k in r)]
    assert [r["step"] for r in lines] == [0, 4, 6]  # the initialization, every 4, the last
    for r in lines:
        assert set(r) == {"step"} | {f"svd_entropy_{g}" for g in FIGURE4_GROUPS}
        assert all(0 < r[f"svd_entropy_{g}"] <= 1 for g in FIGURE4_GROUPS)
    state = ocp.StandardCheckpointer().restore(
        str((tmp_path / "run/checkpoints/6/state").absolute())
    )
    final = svd_entropy_by_group(state["params"])
    for g in FIGURE4_GROUPS:
        assert lines[-1][f"svd_entropy_{g}"] == pytest.approx(float(final[g]), abs=1e-5)


def test_svd_entropy_every_flag():
    assert TrainConfig().svd_entropy_every == 0  # off by default
    assert config_from_args(["--svd-entropy-every", "50"]).svd_entropy_every == 50
    with pytest.raises(ConfigError, match="--svd-entropy-every must be >= 0, got -1"):
        config_from_args(["--svd-entropy-every", "-1"])
