"""Joining a multi-host run (muonjax.parallel.cluster.start): explicit
coordinates win, a cluster's environment is used when none are given, a
single machine or a one-task job is left alone, half-given flags are an error.
jax.distributed.initialize is recorded, not called (the real two-process run
under simulated SLURM: tests/test_parallel.py)."""

import jax
import pytest

from muonjax.parallel import cluster

SLURM = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="node[001-002]", SLURM_NTASKS="2",
             SLURM_PROCID="1", SLURM_LOCALID="0")  # fmt: skip
CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "KUBERNETES_", "TPU_", "MEGASCALE_")


@pytest.fixture
def calls(monkeypatch):
    """Calls of jax.distributed.initialize; the environment without any cluster's variables."""
    import os

    for name in list(os.environ):
        if name.startswith(CLUSTER_PREFIXES):
            monkeypatch.delenv(name)
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: recorded.append(a))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # gloo, after the backend started
    return recorded


def test_a_single_machine_is_left_alone(calls):
    assert cluster.detected_cluster() is None
    assert cluster.start(None, None, None) is None
    assert calls == []


def test_slurm_is_detected_and_a_one_task_job_left_alone(calls, monkeypatch):
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    env = cluster.detected_cluster()
    assert env.name == "slurm"
    # JAX's own reading of the job: the first node, a port from the job id
    assert env.get_coordinator_address(None, None) == f"node001:{4242 % 4096 + 61440}"
    joined = cluster.start(None, None, None)
    assert (joined.how, calls) == ("slurm", [()])  # initialize() reads the environment itself
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert cluster.start(None, None, None) is None and len(calls) == 1


def test_explicit_coordinates_win_over_the_cluster(calls, monkeypatch):
    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    joined = cluster.start("10.0.0.1:1234", 4, 3)
    assert joined.how == "flags" and calls == [("10.0.0.1:1234", 4, 3)]


@pytest.mark.parametrize(
    "flags, message",
    [
        (("h:1", None, 0), "go together"),
        ((None, 2, None), "go together"),
        (("h:1", 2, 2), r"--process-id 2 is not in \[0, --num-processes 2\)"),
    ],
)
def test_half_given_coordinates_are_an_error(calls, flags, message):
    with pytest.raises(cluster.ClusterError, match=message):
        cluster.start(*flags)
    assert calls == []


def test_cli_half_given_coordinates_exit_2_and_write_nothing(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "muonjax", "train", "--out", str(tmp_path / "run"),
         "--coordinator", "127.0.0.1:1234"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "muonjax: error: --coordinator, --num-processes and --process-id go together (or none "
        "of them, to use the cluster's own: SLURM, Open MPI, Cloud TPU, Kubernetes)"
    ]
    assert not (tmp_path / "run").exists()
