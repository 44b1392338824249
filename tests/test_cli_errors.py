"""Bad input to `muonjax train`: one line on stderr, exit code 2, nothing overwritten.

Most cases call the CLI's `main` in this process (a JAX start-up each would
cost more than the suite's checks of them); the ones about the process itself
(a device count, --help, exit codes seen from outside) start a real one."""

import contextlib
import io
import os
import signal
import subprocess
import sys
import types

import pytest
from conftest import DENSE

from muonjax.cli import main

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

RUN = [sys.executable, "-m", "muonjax", "train", "--no-progress"]


def _process(*args, cwd):
    return subprocess.run([*RUN, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def _train(*args, cwd):
    """`muonjax train --no-progress ARGS` run by `main` in this process, from `cwd`:
    its exit code and what it printed to stderr (as subprocess.run would give)."""
    err, handlers = io.StringIO(), {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    here = os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["train", "--no-progress", *map(str, args)])
    finally:
        os.chdir(here)
        for s, handler in handlers.items():  # main leaves them ignored after a run
            signal.signal(s, handler)
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())


def _assert_usage_error(result, match):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert match in lines[0], lines[0]


@pytest.fixture
def text_dir(tmp_path):
    data = tmp_path / "text"
    data.mkdir()
    (data / "a.txt").write_text("hello world, this is some text to train on.\n" * 200)
    return data


@pytest.mark.parametrize(
    "args, match",
    [
        (
            ["--preset", "huge"],
            "--preset 'huge' is unknown (valid: tiny, small, moonlight-16b-a3b)",
        ),
        (["--optimizer", "sgd"], "--optimizer 'sgd' is unknown (valid: muon, adamw)"),
        (["--steps", "-3"], "--steps must be >= 0, got -3"),
        (["--learning-rate=-0.001"], "--learning-rate must be positive and finite, got -0.001"),
        (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
        (
            ["--data", "no/such/file.txt"],
            "--data no/such/file.txt is not a file or folder and matches no file",
        ),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--model", "d_model=wide"], "--model d_model=wide: expected int"),
        (
            ["--model", "heads=4"],
            "--model: unknown key heads (valid: vocab_size, d_model, n_layers",
        ),
        (["--learning-rate", "inf"], "--learning-rate must be positive and finite, got inf"),
        (["--model-config", "no/such.json"], "--model-config no/such.json: No such file"),
        # issue 23: a ZeroDivisionError traceback; absurd values of a valid type
        (["--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
        (["--model", "kv_lora_rank=0"], "kv_lora_rank=0"),
        (["--model", "kv_lora_rank=-4"], "kv_lora_rank=-4"),
    ],
)
def test_bad_flags(tmp_path, args, match):
    _assert_usage_error(_train("--out", str(tmp_path / "run"), *args, cwd=tmp_path), match)
    assert not (tmp_path / "run").exists()


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    """What the in-process cases check, seen from outside: no traceback, no more lines."""
    for args, match in [
        (["--optimizer", "sgd"], "--optimizer 'sgd' is unknown"),
        (["--data", str(tmp_path / "none.txt")], "is not a file or folder"),
        (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    ]:
        _assert_usage_error(_process("--out", str(tmp_path / "run"), *args, cwd=tmp_path), match)
    assert not (tmp_path / "run").exists()


def test_bad_data_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    folder = tmp_path / "nothing"
    folder.mkdir()
    for path, match in [
        (empty, "holds no text (all files are empty)"),
        (latin1, "is not UTF-8 text (invalid byte at offset 3)"),
        (binary, "looks binary (NUL byte at offset 8)"),
        (folder, "holds no files"),
    ]:
        result = _train("--out", str(tmp_path / "run"), "--data", str(path), cwd=tmp_path)
        _assert_usage_error(result, match)
    assert not (tmp_path / "run").exists()


def test_too_little_data(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus\n")
    result = _train("--out", str(tmp_path / "run"), "--data", str(small), cwd=tmp_path)
    _assert_usage_error(result, "fewer than one batch")


def test_batch_not_divisible_by_data_parallel_size(tmp_path, text_dir):
    result = _process(
        "--out",
        str(tmp_path / "run"),
        "--cpu-devices",
        "8",
        "--batch-size",
        "12",
        "--data",
        str(text_dir),
        cwd=tmp_path,
    )
    _assert_usage_error(result, "--batch-size 12 is not divisible by the data-parallel size 8")


def test_existing_out_is_never_overwritten(tmp_path, text_dir):
    out = tmp_path / "run"
    out.mkdir()
    keep = out / "precious.txt"
    keep.write_text("do not touch")
    result = _train("--out", str(out), "--data", str(text_dir), cwd=tmp_path)
    _assert_usage_error(result, f"--out {out} already exists; pass --resume")
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert keep.read_text() == "do not touch"


def test_resume_with_nothing_to_resume(tmp_path):
    result = _train("--out", str(tmp_path / "none"), "--resume", cwd=tmp_path)
    _assert_usage_error(result, "nothing to resume in")


def test_resume_with_incompatible_config(tmp_path, text_dir):
    out = tmp_path / "run"
    args = [
        "--out",
        str(out),
        "--data",
        str(text_dir),
        "--model",
        DENSE,
        "--steps",
        "2",
        "--batch-size",
        "8",  # this process's 8 devices
        "--seq-len",
        "32",
        "--validation-fraction",
        "0.1",
    ]
    assert _train(*args, cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = _train(
        "--out", str(out), "--resume", "--steps", "4", "--weight-decay", "0.5", cwd=tmp_path
    )
    _assert_usage_error(result, "was trained with another config (weight_decay: 0.1 -> 0.5)")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_remat_takes_a_policy_and_names_the_valid_ones(tmp_path):
    match = "--remat 'dot' is unknown (valid: none, dots, full)"
    _assert_usage_error(
        _train("--out", str(tmp_path / "run"), "--remat", "dot", cwd=tmp_path), match
    )
    assert not (tmp_path / "run").exists()


def test_help_explains_every_flag():
    result = subprocess.run([*RUN[:-1], "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in [
        "--preset",
        "--optimizer",
        "--steps",
        "--batch-size",
        "--seq-len",
        "--learning-rate",
        "--warmup-steps",
        "--weight-decay",
        "--seed",
        "--data",
        "--out",
        "--resume",
        "--checkpoint-every",
        "--eval-every",
        "--cpu-devices",
        "--tokenizer",
    ]:
        assert flag in result.stdout


# Issue 12: each of these failed with a traceback, wrote files, hung or ran on today's code.
@pytest.mark.parametrize(
    "args, match",
    [
        (["--learning-rate", "nan"], "--learning-rate must be positive and finite, got nan"),
        (["--weight-decay", "inf"], "--weight-decay must be >= 0 and finite, got inf"),
        (["--adam-eps=-inf"], "--adam-eps must be positive and finite, got -inf"),
        (["--seed", "4294967296"], "--seed must be in [0, 4294967295], got 4294967296"),
        (["--seed", str(2**63)], f"--seed must be in [0, 4294967295], got {2**63}"),
        (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
        (["--mesh", "data=\u00b2"], "'data=\u00b2' is not AXIS=SIZE"),
        (["--mesh", "data=2,data=4"], "--mesh 'data=2,data=4': axis data is given twice"),
        (["--eval-batches", "0"], "--eval-batches must be at least 1, got 0"),
        (["--cpu-devices", "100000"], "--cpu-devices must be in [1, 4096], got 100000"),
    ],
)
def test_bad_values_fail_before_anything_is_written(tmp_path, args, match):
    _assert_usage_error(_train("--out", str(tmp_path / "run"), *args, cwd=tmp_path), match)
    assert list(tmp_path.iterdir()) == []


def test_every_float_field_must_be_finite():
    import dataclasses
    import math

    from muonjax.train.config import TrainConfig
    from muonjax.train.errors import ConfigError

    floats = [f.name for f in dataclasses.fields(TrainConfig) if "float" in str(f.type)]
    assert "large_logit_threshold" in floats and "validation_fraction" in floats
    for name in floats:
        for bad in (math.inf, -math.inf, math.nan):
            with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')} must "):
                TrainConfig(**{name: bad})


def test_remote_out_is_refused(tmp_path):
    result = _train("--out", "gs://bucket/run", cwd=tmp_path)
    _assert_usage_error(
        result, "--out gs://bucket/run: remote paths are not supported; use a local or mounted"
    )
    assert list(tmp_path.iterdir()) == []


def test_out_that_cannot_be_created(tmp_path):
    target = tmp_path / "gone"
    link = tmp_path / "link"
    link.symlink_to(target)
    result = _train("--out", str(link), cwd=tmp_path)
    _assert_usage_error(result, f"--out {link}: {link} is a symbolic link to {target}")
    result = _train("--out", str(link / "run"), cwd=tmp_path)
    _assert_usage_error(result, "which does not exist")
    afile = tmp_path / "afile"
    afile.write_text("keep")
    result = _train("--out", str(afile / "run"), cwd=tmp_path)
    _assert_usage_error(result, f"--out {afile / 'run'}: {afile} is not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "link"]
    assert afile.read_text() == "keep" and not target.exists()


def test_out_on_read_only_location(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes through file permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        result = _train("--out", str(ro / "run"), cwd=tmp_path)
        _assert_usage_error(result, f"--out {ro / 'run'}: {ro} is not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_resume_with_corrupt_config_json(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"train": {"steps": 2,')
    result = _train("--out", str(out), "--resume", cwd=tmp_path)
    _assert_usage_error(result, f"--resume: {out / 'config.json'} is not valid JSON")
    (out / "config.json").write_text("[1, 2]")
    result = _train("--out", str(out), "--resume", cwd=tmp_path)
    _assert_usage_error(result, f"--resume: {out / 'config.json'} is not a muonjax run's config")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_inspect_mesh_too_large_to_simulate(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "muonjax", "inspect", "--mesh", "data=100000"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    _assert_usage_error(result, "inspect simulates at most 4096")


def test_help_says_each_default_once():
    import re

    for command in ("train", "inspect"):
        result = subprocess.run(
            [sys.executable, "-m", "muonjax", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0
        text = " ".join(result.stdout.split())
        assert "(default: None)" not in text
        for flag_help in re.split(r"\s(?=--[a-z])", text):
            assert flag_help.count("(default:") <= 1, flag_help
