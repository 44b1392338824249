"""Sharding on 8 simulated CPU devices: sharded steps equal the 1-device step,
ZeRO-1 partitions the optimizer state, Distributed Muon orthogonalizes each
matrix once, meshes are checked, and multi-process runs agree."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muonjax.models import preset
from muonjax.optim.distributed import spread_flops
from muonjax.parallel import MeshError, Plan, make_mesh, parse_mesh, run_mesh
from muonjax.train import TrainConfig, read_metrics, run
from muonjax.train.corpus import load_corpus
from muonjax.train.costs import (
    muon_leaves,
    newton_schulz_total,
    optimizer_flops,
    shard_bytes,
    step_costs,
)
from muonjax.train.program import build
from muonjax.train.shards import write_shards
from muonjax.train.step import param_groups

# data alone, and every axis (the two-process test runs data=4,expert=2)
MESHES = ["data=8", "data=2,expert=2,tensor=2"]
TINY = preset("tiny")
# tiny cut to its MoE layer (experts, router, all-to-alls; about half the compile time), for
# the tests about costs and processes rather than about every kind of layer's sharding
MOE_LAYER = {"n_layers": 1, "first_k_dense": 0}


def _run_steps(config, mesh, batches):
    program = build(config, TINY, mesh)
    state = program.init()
    losses = []
    for tokens in batches:
        state, metrics = program.step(state, jax.device_put(tokens, program.batch))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@pytest.mark.parametrize(
    "optimizer, meshes",
    [("muon", MESHES), ("adamw", MESHES[-1:])],  # AdamW is elementwise: one mesh with every axis
)
@pytest.mark.slow
def test_sharded_steps_equal_single_device_step(optimizer, meshes):
    config = TrainConfig(
        optimizer=optimizer, batch_size=8, seq_len=32, warmup_steps=0, learning_rate=1e-2
    )
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (8, 33)).astype(np.int32) for _ in range(3)]
    one = make_mesh(parse_mesh("data=1"), devices=jax.devices()[:1])
    ref_losses, ref_params = _run_steps(config, one, batches)
    for mesh_text in meshes:
        losses, params = _run_steps(
            config.replace(mesh=mesh_text), make_mesh(parse_mesh(mesh_text)), batches
        )
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=mesh_text)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=mesh_text)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_zero1_partitions_optimizer_state_over_data(optimizer):
    config = TrainConfig(optimizer=optimizer, batch_size=8, mesh="data=8")
    mesh = make_mesh(parse_mesh("data=8"))
    program = build(config, TINY, mesh)
    replicated = build(config.replace(zero1=False), TINY, mesh)
    opt = program.shapes.opt_state
    sharded_bytes = shard_bytes(opt, program.shardings.opt_state)
    full_bytes = shard_bytes(opt, replicated.shardings.opt_state)
    assert full_bytes == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt))
    # 1/data, but for the few leaves no axis of which 8 divides (step counts)
    assert sharded_bytes <= full_bytes / 8 * 1.02 + 64
    # parameters stay replicated over data
    assert shard_bytes(program.shapes.params, program.plan.params) == sum(
        x.size * 4 for x in jax.tree.leaves(program.shapes.params)
    )


def _optimizer_flops(config, model_config, mesh):
    program = build(config, model_config, mesh)
    return optimizer_flops(program), program.shapes.params


def test_each_device_orthogonalizes_only_its_own_matrices():
    # every matrix in a stack that data divides: 8 MoE layers, 8 experts
    model_config = TINY.replace(n_layers=8, first_k_dense=0)
    config = TrainConfig(optimizer="muon", batch_size=8, mesh="data=8")
    per_device, params = _optimizer_flops(config, model_config, make_mesh(parse_mesh("data=8")))
    whole, _ = _optimizer_flops(
        config, model_config, make_mesh(parse_mesh("data=1"), devices=jax.devices()[:1])
    )
    assert whole >= newton_schulz_total(params)  # the compiled count includes Newton-Schulz
    assert per_device <= 1.15 * whole / 8, (per_device, whole)


def test_matrices_outside_divisible_stacks_are_spread_over_devices_too():
    # tiny's stacks hold 1 layer each: nothing divides data=8, yet each device
    # orthogonalizes whole matrices of its own (Distributed Muon by ownership)
    config = TrainConfig(optimizer="muon", batch_size=8, mesh="data=8")
    per_device, params = _optimizer_flops(config, TINY, make_mesh(parse_mesh("data=8")))
    planned = spread_flops([p.shape for _, p in muon_leaves(params)], 8)
    assert planned <= per_device <= 1.1 * planned
    assert per_device < 0.4 * newton_schulz_total(params)  # the paper's scheme: all of it


def test_bad_meshes_are_clear_errors():
    with pytest.raises(MeshError, match="has 4 devices but there are 8"):
        make_mesh(parse_mesh("data=4"))
    with pytest.raises(MeshError, match="'model=2' is not AXIS=SIZE"):
        parse_mesh("data=4,model=2")
    with pytest.raises(MeshError, match="'data=0' is not AXIS=SIZE"):
        parse_mesh("data=0")
    six_experts = _abstract_params(TINY.replace(n_routed_experts=6))
    with pytest.raises(
        MeshError, match=r"mesh expert=8 does not divide dimension 1 \(experts\) of size 6"
    ):
        Plan(make_mesh(parse_mesh("expert=8")), six_experts)
    with pytest.raises(
        MeshError, match="--batch-size 12 is not divisible by the data-parallel size 8"
    ):
        run_mesh("data=4,expert=2", 12)


def _abstract_params(config):
    from flax import nnx

    from muonjax.models import abstract_model

    return nnx.state(abstract_model(config), nnx.Param)


def test_cli_bad_mesh_exits_2(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "muonjax",
            "train",
            "--cpu-devices",
            "8",
            "--mesh",
            "data=3",
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == "muonjax: error: --mesh data=3,expert=1,tensor=1 has 3 devices but there are 8"
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_inspect_reports_per_device_costs():
    mesh = make_mesh(parse_mesh("data=8"))
    config = TrainConfig(batch_size=8, seq_len=64, mesh="data=8", model=MOE_LAYER)
    reports = {opt: step_costs(config.replace(optimizer=opt), mesh) for opt in ("muon", "adamw")}
    for r in reports.values():
        for key in (
            "param_bytes",
            "opt_state_bytes",
            "peak_bytes",
            "step_flops",
            "optimizer_flops",
        ):
            assert r[key] > 0
        assert set(r["collective_bytes"]) >= {
            "all-reduce",
            "all-gather",
            "reduce-scatter",
            "all-to-all",
        }
        # ZeRO-1 on 8 devices: gradients reduce-scattered, parameters gathered,
        # 7/8 of the parameter bytes each
        assert r["collective_bytes"]["reduce-scatter"] == pytest.approx(
            r["param_bytes"] * 7 / 8, rel=0.02
        )
        assert r["collective_bytes"]["all-gather"] == pytest.approx(
            r["param_bytes"] * 7 / 8, rel=0.02
        )
    muon, adamw = reports["muon"], reports["adamw"]
    total = lambda r: sum(r["collective_bytes"].values())
    # Distributed Muon adds only the all-to-alls that bring packed matrices to
    # their owners and back: each about 1/8 of their bytes on 8 devices
    to_owners = muon["collective_bytes"]["all-to-all"]
    assert 0 < to_owners <= 0.25 * muon["param_bytes"]
    assert total(muon) - to_owners <= total(adamw) * 1.001
    # Muon keeps one buffer per hidden matrix, AdamW two per parameter
    groups = param_groups(_abstract_params(config.model_config()))
    expected = (groups["muon"] + 2 * groups["adamw"]) / (2 * (groups["muon"] + groups["adamw"]))
    assert muon["opt_state_bytes"] / adamw["opt_state_bytes"] == pytest.approx(expected, rel=0.01)
    assert muon["optimizer_flops"] > 100 * adamw["optimizer_flops"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(load_corpus().texts[:30]):
        (folder / f"doc{i:02d}.py").write_text(text)
    return str(folder)


def _free_slurm_port() -> int:
    """A free port in the range JAX's SLURM detection derives from the job id."""
    for port in range(65535 - 2**12 + 1, 65536):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for the simulated SLURM job")


@pytest.mark.slow
def test_two_processes_by_slurm_and_by_flags_agree_with_one(corpus, tmp_path):
    """`srun -n 2 muonjax train --data SHARDS ...` on one node, simulated: the
    SLURM variables JAX's cluster detection reads. Process 1 joins by them
    alone; process 0 has them too but is given the same coordinates as flags,
    which win: both ways of joining, in one run. The two processes read the
    corpus's `muonjax tokenize` shards, each its own rows; the one process of
    8 devices reads the text."""
    shards = tmp_path / "shards"
    write_shards(TrainConfig(data=(corpus,)), shards, log=lambda *_: None)
    common = [
        "--data",
        str(shards),
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--seq-len",
        "32",
        "--log-every",
        "1",
        "--eval-every",
        "4",
        "--checkpoint-every",
        "2",
        "--mesh",
        "data=4,expert=2",
        "--model",
        "n_layers=1,first_k_dense=0",
        "--no-progress",
    ]
    cmd = [sys.executable, "-m", "muonjax", "train"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUONJAX_", "SLURM_"))}
    port = _free_slurm_port()
    slurm = dict(SLURM_JOB_ID=str(port % 2**12), SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2")
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"]
    procs = [
        subprocess.Popen(
            [
                *cmd,
                "--out",
                str(tmp_path / "two"),
                "--cpu-devices",
                "4",
                *common,
                *(flags if i == 0 else []),
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert "muonjax: process 0 of 2 (flags): 4 local devices of 8 (cpu)" in outs[0][0]
    # the same run in this process, on its 8 devices
    run(
        TrainConfig(
            out=str(tmp_path / "one"), data=(corpus,), steps=4, batch_size=8, seq_len=32, log_every=1,
            eval_every=4, checkpoint_every=2, mesh="data=4,expert=2", progress=False,
            model=MOE_LAYER,
        ),
        log=lambda *_: None,
    )  # fmt: skip
    two_losses = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    one_losses = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    assert len(two_losses) == 4
    np.testing.assert_allclose(two_losses, one_losses, rtol=1e-6)
    assert (
        json.loads((tmp_path / "two" / "config.json").read_text())["environment"]["processes"] == 2
    )


@pytest.mark.slow
def test_restore_onto_a_smaller_mesh(corpus, tmp_path):
    base = dict(data=(corpus,), steps=6, decay_steps=6, warmup_steps=2, batch_size=8, seq_len=32, log_every=1,
                eval_every=6, checkpoint_every=3, progress=False,
                model={"n_layers": 1, "first_k_dense": 1})  # fmt: skip
    run(TrainConfig(out=str(tmp_path / "whole"), mesh="data=8", **base), log=lambda *_: None)
    run(
        TrainConfig(out=str(tmp_path / "moved"), mesh="data=8", **{**base, "steps": 3}),
        log=lambda *_: None,
    )
    # resume the 8-device run on a mesh of 4 of the devices
    result = subprocess.run(
        [sys.executable, "-m", "muonjax", "train", "--out", str(tmp_path / "moved"), "--resume", "--steps", "6",
         "--cpu-devices", "4", "--mesh", "data=4", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from step 3 on mesh data=4" in result.stdout
    whole = [r["loss"] for r in read_metrics(tmp_path / "whole") if "loss" in r]
    moved = [r["loss"] for r in read_metrics(tmp_path / "moved") if "loss" in r]
    assert moved[:3] == whole[:3]  # the first 3 steps are the same run
    np.testing.assert_allclose(moved, whole, rtol=1e-5)  # then another reduction order
    assert jnp.isfinite(moved[-1])


@pytest.mark.slow
def test_inspect_cli_json():
    result = subprocess.run(
        [sys.executable, "-m", "muonjax", "inspect", "--preset", "tiny", "--mesh", "data=4,expert=2",
         "--model", "n_layers=1,first_k_dense=1", "--seq-len", "64", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    for key in ("param_bytes", "opt_state_bytes", "peak_bytes", "step_flops", "optimizer_flops"):
        assert report[key] > 0, key
    assert report["mesh"] == "data=4,expert=2,tensor=1" and report["devices"] == 8
    assert report["collective_bytes"]["reduce-scatter"] > 0
