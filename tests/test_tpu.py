"""TPU slices without a TPU: slice names, their devices from libtpu, the
TPU-compiled step of `muonjax inspect --tpu`, and a quiet start with libtpu
installed on a machine without a TPU."""

import json
import os
import subprocess
import sys

import pytest

from muonjax.parallel import tpu
from muonjax.parallel.tpu import TPUError, parse_slice, slice_devices

needs_libtpu = pytest.mark.skipif(tpu.libtpu_version() is None, reason="libtpu not installed")


@pytest.mark.parametrize(
    "name, grid, chips",
    [
        ("v5p-8", (2, 2, 1), 4),
        ("v5p-32", (2, 2, 4), 16),
        ("v5p-64", (2, 4, 4), 32),
        ("v5p-128", (4, 4, 4), 64),
        ("v5p-256", (4, 4, 8), 128),
        ("v5e-8", (2, 4), 8),
        ("v5e-256", (16, 16), 256),
        ("v6e-64", (8, 8), 64),
        ("v5p:4x4x8", (4, 4, 8), 128),
        ("v6e:2x4", (2, 4), 8),
    ],
)
def test_slice_names_give_cloud_tpu_shapes(name, grid, chips):
    s = parse_slice(name)
    assert (s.grid, s.chips) == (grid, chips)
    assert parse_slice(s.topology) == s == parse_slice(s.name)


@pytest.mark.parametrize(
    "name, says",
    [
        ("v5p-6", "two per chip"),
        ("v5p-4", "at least 4"),
        ("v5e-12", "power-of-two"),
        ("v4-8", "GEN one of v5e, v5p, v6e"),
        ("v5p:2x2", "3 axes"),
        ("tpu", "expected GEN-N"),
    ],
)
def test_bad_slice_names_say_what_is_valid(name, says):
    with pytest.raises(TPUError, match=says):
        parse_slice(name)


def test_without_libtpu_one_line_says_how_to_install(monkeypatch):
    monkeypatch.setattr(tpu, "libtpu_version", lambda: None)
    with pytest.raises(TPUError, match=r"pip install 'muonjax\[tpu\]'"):
        slice_devices(parse_slice("v5p-8"))


@needs_libtpu
def test_slice_devices_are_the_chips():
    devices = slice_devices(parse_slice("v5e-8"))
    assert len(devices) == 8
    assert {d.platform for d in devices} == {"tpu"}
    assert devices[0].device_kind == "TPU v5 lite"


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=600
    )


@needs_libtpu
@pytest.mark.slow
def test_inspect_tpu_compiles_the_step_for_the_slice(tmp_path):
    # twice, sharing a persistent compilation cache (as the suite's processes
    # do): a compile-only TPU client cannot load an executable back from one
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path)}
    for _ in range(2):
        r = _run(
            "-m", "muonjax", "inspect", "--tpu", "v5p-8", "--preset", "tiny",
            "--mesh", "data=2,expert=2", "--seq-len", "128", "--remat", "full", "--json", env=env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""  # libtpu is quiet, and no cache entry is read back
    report = json.loads(r.stdout)
    assert report["platform"] == "tpu" and report["devices"] == 4
    assert report["tpu"] == "v5p-8" and report["libtpu"] == tpu.libtpu_version()
    assert report["hbm_bytes"] == 95 * 2**30 and report["fits"] is True
    memory = report["memory_bytes"]
    assert (
        report["peak_bytes"]
        == memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
    )
    assert report["peak_bytes"] > report["param_bytes"] + report["opt_state_bytes"]
    # the estimate: the model at peak FLOP/s (remat full: its forward twice),
    # the optimizer update's roofline and the collectives, added
    peak, parts = 459e12, ("model", "optimizer", "collective")
    assert report["remat"] == "full"
    assert report["estimate_model_seconds"] == pytest.approx(report["model_flops"] * 4 / 3 / peak)
    assert report["estimate_optimizer_seconds"] >= report["optimizer_flops"] / peak
    assert report["estimate_step_seconds"] == pytest.approx(
        sum(report[f"estimate_{p}_seconds"] for p in parts)
    )
    assert sum(report["collective_bytes"].values()) > 0
    assert report["compile_seconds"] > 0


def test_inspect_tpu_bad_slice_is_a_usage_error():
    r = _run("-m", "muonjax", "inspect", "--tpu", "v5p-6", "--preset", "tiny")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "two per chip" in r.stderr, r.stderr


@needs_libtpu
def test_inspect_tpu_mesh_must_cover_the_chips():
    r = _run("-m", "muonjax", "inspect", "--tpu", "v5p-8", "--preset", "tiny", "--mesh", "data=8")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "has 8 devices but there are 4" in r.stderr, r.stderr


@needs_libtpu
@pytest.mark.parametrize("skip", [True, False])
def test_libtpu_without_a_tpu_starts_quietly_on_the_cpu(skip):
    """skip_absent_tpu goes to the CPU at once; without it JAX tries a TPU
    backend first and libtpu logs errors (so the check can fail)."""
    # as a fresh shell has it (slice_devices sets TPU_* in this process)
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    code = "import jax; print(jax.devices()[0].platform)"
    if skip:
        code = "from muonjax.parallel.tpu import skip_absent_tpu; skip_absent_tpu(); " + code
    r = _run("-c", code, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "cpu"
    assert (r.stderr == "") == skip, r.stderr


@needs_libtpu
@pytest.mark.slow
def test_auto_picks_the_tpu_kernels_for_a_slice():
    """Compiled for TPU chips from this CPU host, "auto" means splash attention
    (forward, dq, dkv: 3 kernels a layer) and megablox experts (3 gmm forward,
    a gmm and a tgmm for each in the backward pass: 9 an MoE layer), and
    bfloat16 Newton-Schulz; each scanned stack of layers compiles one body."""
    import jax
    import jax.numpy as jnp

    from muonjax.models import preset
    from muonjax.parallel import make_mesh, parse_mesh
    from muonjax.train import TrainConfig
    from muonjax.train.program import build

    config = TrainConfig(optimizer="muon", batch_size=8, seq_len=128, mesh="data=2,expert=2")
    model_config = preset("tiny")
    assert (model_config.attention_kernel, model_config.moe_dispatch) == ("auto", "auto")
    mesh = make_mesh(parse_mesh(config.mesh), slice_devices(parse_slice("v5p-8")))
    program = build(config, model_config, mesh)
    tokens = jax.ShapeDtypeStruct((8, 129), jnp.int32, sharding=program.batch)
    text = program.step.lower(program.abstract(), tokens).compile().as_text()
    stacks = (model_config.first_k_dense > 0) + (model_config.n_moe_layers > 0)
    assert text.count("tpu_custom_call") == 3 * stacks + 9 * (model_config.n_moe_layers > 0)


def test_newton_schulz_dtype_auto_follows_the_platform_compiled_for():
    from muonjax.train import TrainConfig
    from muonjax.train.optimizers import ns_dtype

    config = TrainConfig()
    assert config.ns_dtype == "auto"
    assert (ns_dtype(config, "tpu"), ns_dtype(config, "gpu")) == ("bfloat16", "bfloat16")
    assert ns_dtype(config, "cpu") == ns_dtype(config) == "float32"  # this host
    assert ns_dtype(config.replace(ns_dtype="float32"), "tpu") == "float32"


@needs_libtpu
@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_collectives_in_a_scan_count_once_per_iteration(platform):
    """The CPU compiler annotates a scan's trip count, the TPU compiler does
    not (its loop condition compares the counter with a constant): both count
    the all-reduce in a 64-step scan 64 times."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from muonjax.parallel import hlo

    devices = slice_devices(parse_slice("v5p-8")) if platform == "tpu" else jax.devices()[:4]
    mesh = Mesh(np.asarray(devices), ("x",))

    def scanned(x):
        step = lambda c, _: (jnp.tanh(c + jax.lax.psum(c, "x")), None)
        return jax.lax.scan(step, x, None, length=64)[0]

    f = jax.jit(jax.shard_map(scanned, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    x = jax.ShapeDtypeStruct((32, 128), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    comm = hlo.collective_bytes(f.lower(x).compile().as_text(), 4)
    assert comm["in_loops_of_unknown_trip_count"] == 0
    assert comm["bytes"]["all-reduce"] == 64 * 2 * 3 / 4 * 8 * 128 * 4
