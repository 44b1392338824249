"""`muonjax train`'s set-up is bounded: a model that cannot fit, a --skip-batches
past the data, a --resume-from with no such checkpoint and a step that runs out
of device memory are each one line and exit 2, in seconds, with nothing written.

In-process `main` where the process is not the point; a subprocess where it is
(memory limits set on the process)."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import DENSE
from test_cli_errors import _assert_usage_error, _train

from muonjax.models import memory, param_counts
from muonjax.parallel.mesh import make_mesh, parse_mesh
from muonjax.train import TrainConfig, pipeline
from muonjax.train.loop import _check_memory

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

# a run of 8 x 32 on this process's 8 CPU devices, on the text of the `text` fixture
SIZES = ["--batch-size", "8", "--seq-len", "32", "--validation-fraction", "0.1"]
SMALL = ["--model", DENSE, *SIZES]
TOO_LARGE = ["n_routed_experts=10000000", "vocab_size=10000000000", "n_layers=1000000"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "a.txt"
    path.write_text("".join(f"line {i}: some words to train on, and more.\n" for i in range(400)))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text):
    """A run of 4 steps with checkpoints 2 and 4; tests copy it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    args = ["--out", out, "--data", text, *SMALL, "--steps", "4", "--checkpoint-every", "2"]
    result = _train(*args, cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return out


def _copy(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out, {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _unchanged(out, before):
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("model", TOO_LARGE)
def test_a_model_that_cannot_fit_is_refused_before_it_is_built(tmp_path, text, model):
    args = ["--out", tmp_path / "run", "--data", text, *SIZES, "--model", model]
    result = _train(*args, cwd=tmp_path)
    _assert_usage_error(result, "float32 parameters x 3), more than the")
    assert result.stderr.rstrip().endswith("or pass --no-memory-check to try anyway")
    assert list(tmp_path.iterdir()) == []


def test_the_memory_rule_counts_parameters_gradients_and_moments(monkeypatch):
    """(2 + m) float32 copies of the parameters, m = 1 for Muon, 2 for AdamW, against
    the devices' memory: a model that fits exactly passes, a byte less does not."""
    config = TrainConfig(model={"n_layers": 1, "first_k_dense": 1})
    model_config = config.model_config()
    mesh = make_mesh(parse_mesh(None))
    params = param_counts(model_config)["total"]
    for optimizer, copies in (("muon", 3), ("adamw", 4)):
        need = params * 4 * copies
        monkeypatch.setattr(memory, "host_available_bytes", lambda have=need: have)
        _check_memory(config.replace(optimizer=optimizer), model_config, mesh)
        monkeypatch.setattr(memory, "host_available_bytes", lambda have=need - 1: have)
        with pytest.raises(ValueError, match=rf"float32 parameters x {copies}\)"):
            _check_memory(config.replace(optimizer=optimizer), model_config, mesh)
        _check_memory(config.replace(optimizer=optimizer, memory_check=False), model_config, mesh)


def _limited(limit: int) -> list[str]:
    """`muonjax` in a process whose address space is at most `limit` bytes (set in the
    child before it imports anything: preexec_fn would fork this multithreaded one)."""
    code = (
        "import resource, runpy, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, resource.RLIM_INFINITY))\n"
        "runpy.run_module('muonjax', run_name='__main__')\n"
    )
    return [sys.executable, "-c", code]


def test_a_real_process_refuses_a_huge_model_in_seconds(tmp_path, text):
    """Where it used to allocate for minutes and ignore SIGTERM; also under an
    address-space limit, with a model that fits the host but not the limit."""
    run = ["train", "--no-progress", "--data", text, *SIZES]
    result = subprocess.run(
        [sys.executable, "-m", "muonjax", *run, "--out", tmp_path / "a", "--model", TOO_LARGE[0]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    _assert_usage_error(result, "float32 parameters x 3), more than the")
    # 40000 experts of 3 x 64 x 64: 0.5 G parameters, 5.9 GiB for Muon's 3 copies
    result = subprocess.run(
        [*_limited(4 * 2**30), *run, "--out", tmp_path / "b", "--model", "n_routed_experts=40000"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    _assert_usage_error(result, "float32 parameters x 3), more than the")
    assert list(tmp_path.iterdir()) == []


def test_running_out_of_device_memory_in_the_first_step_is_one_line(tmp_path):
    """XLA's RESOURCE_EXHAUSTED (here: an attention of 2 x 4 x 8192^2 floats,
    2 GiB, under a 4 GiB address-space limit; the parameters fit) is bad input."""
    data = tmp_path / "data.txt"
    data.write_text("".join(f"line {i}: some words to train on, and more.\n" for i in range(900)))
    result = subprocess.run(
        [
            *_limited(4 * 2**30),
            "train",
            "--no-progress",
            "--out",
            tmp_path / "run",
            "--data",
            data,
            "--model",
            DENSE,
            "--batch-size",
            "2",
            "--seq-len",
            "8192",
            "--validation-fraction",
            "0.5",
            "--steps",
            "1",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    _assert_usage_error(result, "does not fit in the devices' memory (RESOURCE_EXHAUSTED")
    assert "lower --batch-size, raise --grad-accum" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_skip_batches_is_bounded_by_one_pass_over_the_data(tmp_path, trained, text):
    out, before = _copy(trained, tmp_path)
    train_tokens = json.loads((out / "config.json").read_text())["data"]["train_tokens"]
    most = train_tokens // 33 // 8  # windows of 32 + 1 tokens, 8 a batch
    assert most == pipeline.batches_per_pass(range(train_tokens), 32, 8)
    for skip in (most + 1, 10**12):
        result = _train("--out", out, "--skip-batches", skip, cwd=tmp_path)
        _assert_usage_error(result, f"--skip-batches {skip} is more than one pass")
        assert f"at most {most} (batches of 8 x 33 tokens)" in result.stderr
        _unchanged(out, before)
    result = _train("--out", out, "--skip-batches", most, cwd=tmp_path)  # at step 4 of 4 already
    assert result.returncode == 0, result.stderr


def test_skipping_moves_the_iterator_as_reading_would():
    import numpy as np

    tokens = (np.arange(20_000) * 7) % 256
    read, moved = (pipeline.train_batches(tokens, 32, 4, seed=1) for _ in range(2))
    n = pipeline.batches_per_pass(tokens, 32, 4) + 3  # into the second pass
    for _ in range(n):
        next(read)
    pipeline.skip(moved, n)
    for _ in range(4):
        np.testing.assert_array_equal(next(read), next(moved))


def test_resume_from_a_step_with_no_checkpoint(tmp_path, trained):
    out, before = _copy(trained, tmp_path)
    result = _train("--out", out, "--resume-from", 99, cwd=tmp_path)
    _assert_usage_error(result, "--resume-from 99: no checkpoint 99 in ")
    assert result.stderr.rstrip().endswith("(there: 2, 4)")
    _unchanged(out, before)
