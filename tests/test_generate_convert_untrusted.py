"""`muonjax generate` and `muonjax convert` on hostile input (issue 23): flags out
of bounds, prompts too long for the cache or not UTF-8, damaged tokenizers and
checkpoints, a run whose checkpoints are deleted while it is read, and converts
killed half-way. Each is one line and exit 2 (or a warning and the older
checkpoint), and neither command changes the run it reads or leaves a partial
--out behind.

The CLI runs in this process where the process itself is not the point; signals
and the quiet --resume run real subprocesses."""

# the tests take hf_dir, a fixture imported from test_convert, as a parameter
# ruff: noqa: F811

import contextlib
import importlib
import io
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from conftest import signal_while_blocked, tiny_run
from test_convert import _tensors, hf_dir  # noqa: F401 -- hf_dir: a fixture
from test_damaged_checkpoints import _array_file
from test_damaged_checkpoints import _damage as _damage_one_file

from muonjax.cli import main
from muonjax.train import checkpoint, convert, run
from muonjax.train.checkpoint import attempt_restore

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

# the module (muonjax.models exports its function `generate` under the same name)
generate_module = importlib.import_module("muonjax.models.generate")

PROMPT = ["--prompt", "def main(", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def stored(corpus, tmp_path_factory):
    """A tiny run (byte tokenizer, one dense layer) with checkpoints 2 and 4, kept
    aside: tests work on copies."""
    out = tmp_path_factory.mktemp("untrusted") / "run"
    config = tiny_run(corpus, out, steps=4, checkpoint_every=2, eval_every=2, warmup_steps=1)
    run(config, log=lambda *_: None)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]
    return out


@pytest.fixture
def copy(stored, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stored, out)
    return out


def _cli(*args):
    """`muonjax ARGS` run by `main` in this process: exit code, stdout, stderr's lines."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), [line for line in err.getvalue().splitlines() if line.strip()]


def _listing(folder: pathlib.Path):
    """Every path under `folder` with its size and modification time (a folder's
    changes when anything in it is added, removed or renamed)."""
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in [folder, *folder.rglob("*")]
    )


def _never(*args, **kwargs):
    raise AssertionError("the model was loaded: the input should have been refused before")


# -- flags and prompts: refused before anything is loaded -----------------------------------------

LONG = "x" * 100_000  # bytes tokens: 100,000 of them


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--temperature", "nan"], "--temperature nan (valid: 0 for greedy, or positive)"),
        (["--temperature=-0.5"], "--temperature -0.5 (valid: 0 for greedy, or positive)"),
        (["--temperature", "inf"], "--temperature inf (valid: 0 for greedy, or positive)"),
        (["--top-p", "0"], "--top-p 0.0 (valid: more than 0, at most 1)"),
        (["--top-p", "1.5"], "--top-p 1.5 (valid: more than 0, at most 1)"),
        (["--top-p", "nan"], "--top-p nan (valid: more than 0, at most 1)"),
        (["--seed", str(10**23)], f"--seed {10**23} (valid: 0 to 4294967295)"),
        (["--seed=-1"], "--seed -1 (valid: 0 to 4294967295)"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0 (valid: 1 or more)"),
        (
            ["--max-new-tokens", str(10**9)],
            "+ --max-new-tokens 1000000000 = 1,000,000,009 tokens, more than the maximum length "
            "--max-len 8192",
        ),
        (["--prompt", LONG], "the longest prompt (100,000 tokens) + --max-new-tokens 4"),
        (["--max-len", "6"], "the longest prompt (9 tokens) + --max-new-tokens 4 = 13 tokens"),
        (["--max-len", "0"], "--max-len 0 (valid: 1 or more)"),
        (["--prompt", "ab\udcffc"], "--prompt 2 is not UTF-8 text (at character 2)"),
    ],
)
def test_bad_generate_input_is_one_line_before_loading(stored, monkeypatch, flags, match):
    """Unchecked, these printed NUL bytes with exit 0 (NaN), tracebacks (a seed
    past int64, argv's undecodable bytes) or asked XLA for 480 GB (the long prompt)."""
    monkeypatch.setattr(convert, "load_model", _never)
    code, out, err = _cli("generate", "--run", stored, *PROMPT, *flags)
    assert code == 2 and out == ""
    assert len(err) == 1 and match in err[0], err


def test_a_cache_too_large_for_the_device_is_refused_before_loading(stored, monkeypatch):
    """Within --max-len, but the KV cache of 10^11 tokens is terabytes."""
    monkeypatch.setattr(convert, "load_model", _never)
    code, _, err = _cli(
        "generate", "--run", stored, *PROMPT[:2], "--max-len", 10**12, "--max-new-tokens", 10**11
    )
    assert code == 2 and len(err) == 1, err
    assert "needs at least" in err[0] and "GiB the devices can hold" in err[0]


def test_running_out_of_device_memory_while_generating_is_one_line(stored, monkeypatch):
    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 480.0G")

    monkeypatch.setattr("muonjax.cli.generate", exhausted)
    code, _, err = _cli("generate", "--run", stored, *PROMPT)
    assert code == 2 and len(err) == 1, err
    assert "does not fit in the device's memory (RESOURCE_EXHAUSTED" in err[0]
    assert "lower --max-new-tokens" in err[0]


@pytest.mark.parametrize(
    "name, content",
    [
        ("tokenizer.json", b'{"model": {"type": "BPE", "vocab": 7'),
        ("tokenizer.json", b"\0" * 64),
        ("tokenizer_config.json", b"\xff\xfe{"),
    ],
)
def test_a_damaged_tokenizer_is_one_line(hf_dir, tmp_path, name, content):
    checkpoint_dir = tmp_path / "ckpt"
    shutil.copytree(hf_dir, checkpoint_dir)
    (checkpoint_dir / name).write_bytes(content)
    code, _, err = _cli("generate", "--run", checkpoint_dir, *PROMPT)
    assert code == 2 and len(err) == 1, err
    assert f"--run {checkpoint_dir}: its tokenizer does not load (" in err[0]


def test_a_checkpoint_s_max_position_embeddings_bounds_generation(hf_dir, monkeypatch):
    """The fixture's config.json says 128; --max-len lowers or raises it."""
    monkeypatch.setattr(convert, "load_model", _never)
    for flags, most in (([], 128), (["--max-len", 5], 5)):
        code, _, err = _cli("generate", "--run", hf_dir, *PROMPT[:2], "--max-new-tokens", 200,
                            *flags)  # fmt: skip
        assert code == 2 and f"more than the maximum length --max-len {most}" in err[0], err
    monkeypatch.undo()
    code, out, err = _cli(
        "generate", "--run", hf_dir, *PROMPT[:2], "--max-new-tokens", 200, "--max-len", 300
    )
    assert code == 0, err


def test_generate_bounds_its_arguments_for_library_users(stored, monkeypatch):
    model = convert.load_model(convert.model_source(stored))
    cases = [
        (dict(max_new_tokens=10**9), "max_new_tokens=1000000000 = 1,000,000,002 tokens, more"),
        (dict(temperature=float("nan")), "temperature=nan (valid: 0 for greedy, or positive)"),
        (dict(seed=10**23), "seed=100000000000000000000000 (valid: 0 to 4294967295)"),
        (dict(max_len=3), "more than the maximum length max_len=3"),
    ]
    for changes, match in cases:
        with pytest.raises(ValueError, match=re.escape(match)):
            generate_module.generate(model, [[1, 2]], **{"max_new_tokens": 2, **changes})
    monkeypatch.setattr(generate_module, "devices_bytes", lambda devices: 2**20)
    with pytest.raises(generate_module.TooLarge, match=r"needs at least .* more than the 0.0 GiB"):
        generate_module.generate(model, [[1, 2]], max_new_tokens=40_000, max_len=10**6)


# -- damaged checkpoints: the newest that restores, the run left as it is --------------------------


def _damage(kind, step_dir):
    """test_damaged_checkpoints' damage, to every array file of the state: generate
    and convert read the parameters only, which the biggest file need not hold."""
    if kind not in ("truncated", "garbage"):
        return _damage_one_file(kind, step_dir)
    for f in [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]:
        if kind == "truncated":
            os.truncate(f, f.stat().st_size // 2)
        else:
            f.write_bytes(os.urandom(f.stat().st_size))


@pytest.mark.parametrize("kind", ["truncated", "garbage", "no_metadata"])
def test_generate_reads_the_newest_checkpoint_that_restores(copy, kind):
    code, want, _ = _cli("generate", "--run", copy, *PROMPT, "--step", 2)
    assert code == 0
    _damage(kind, copy / "checkpoints" / "4")
    before = _listing(copy)
    code, out, err = _cli("generate", "--run", copy, *PROMPT)
    assert code == 0, err
    assert out == want  # checkpoint 2's
    assert len(err) == 1, err
    assert err[0].startswith(f"warning: checkpoint 4 in {copy / 'checkpoints'} does not restore")
    assert err[0].endswith("read 2 instead, left the run as it is")
    assert _listing(copy) == before  # nothing renamed, nothing written


def test_convert_to_hf_reads_the_newest_checkpoint_that_restores(copy, tmp_path):
    assert _cli("convert", "--to-hf", copy, "--out", tmp_path / "two", "--step", 2)[0] == 0
    _damage("truncated", copy / "checkpoints" / "4")
    before = _listing(copy)
    code, _, err = _cli("convert", "--to-hf", copy, "--out", tmp_path / "hf")
    assert code == 0, err
    assert len(err) == 1 and "checkpoint 4 in" in err[0] and "read 2 instead" in err[0], err
    assert _listing(copy) == before
    want, got = _tensors(tmp_path / "two"), _tensors(tmp_path / "hf")
    assert sorted(want) == sorted(got)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_damaged_step_or_none_that_restores_is_one_line(copy, tmp_path):
    _damage("truncated", copy / "checkpoints" / "4")
    hf = ["--out", tmp_path / "hf"]
    for args in (["generate", "--run", copy, *PROMPT], ["convert", "--to-hf", copy, *hf]):
        code, _, err = _cli(*args, "--step", 4)
        assert code == 2 and len(err) == 1, err
        assert "checkpoint 4 does not restore (" in err[0]
    _damage("garbage", copy / "checkpoints" / "2")
    before = _listing(copy)
    code, _, err = _cli("convert", "--to-hf", copy, *hf)
    assert code == 2 and len(err) == 1, err
    assert f"--to-hf: no checkpoint in {copy / 'checkpoints'} restores (tried steps 4, 2;" in err[0]
    code, _, err = _cli("generate", "--run", copy, *PROMPT)
    assert code == 2 and err[0].startswith("muonjax: error: --run: no checkpoint in"), err
    assert _listing(copy) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no --out, no partial folder


def _racing_reader(trained_on: int):
    """checkpoint._reader whose first read of checkpoint 4 loses a race with the run
    that writes it: the run saved `trained_on` (4's content here) and its retention
    deleted 4, between the listing and the read."""
    real = checkpoint._reader

    def reader(wanted, directory):
        read = real(wanted, directory)

        def racing(step):
            if step == 4 and (directory / "4").exists():
                (directory / "4").rename(directory / str(trained_on))
            return read(step)

        return racing

    return reader


def test_a_checkpoint_deleted_while_it_is_read_is_retried_with_the_newest(copy, monkeypatch):
    code, want, _ = _cli("generate", "--run", copy, *PROMPT)
    monkeypatch.setattr(checkpoint, "_reader", _racing_reader(6))
    code, out, err = _cli("generate", "--run", copy, *PROMPT)
    assert code == 0 and err == [] and out == want  # 6, which holds 4's arrays
    (copy / "checkpoints" / "6").rename(copy / "checkpoints" / "4")
    code, _, err = _cli("generate", "--run", copy, *PROMPT, "--step", 4)
    assert code == 2 and len(err) == 1, err
    assert "checkpoint 4 was deleted while it was read (" in err[0] and "there now: 2, 6" in err[0]


# -- --resume past a damaged checkpoint: one line, none of orbax's echoes -------------------------


def test_resume_past_a_damaged_checkpoint_prints_its_warning_alone(stored, tmp_path):
    """orbax's other reads of the damaged checkpoint, left pending, printed 69 to
    2,533 lines (tracebacks with whole TensorStore specs) as they were collected.
    8 devices: each array is read as 8 shards, so reads are pending when one fails."""
    out = tmp_path / "run"
    shutil.copytree(stored, out)
    with open(_array_file(out / "checkpoints" / "4"), "r+b") as f:
        f.truncate(os.fstat(f.fileno()).st_size // 3)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "muonjax",
            "train",
            "--out",
            out,
            "--resume",
            "--steps",
            "6",
            "--cpu-devices",
            "8",
            "--no-progress",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint 4 in" in warnings[0], lines
    assert [line for line in result.stderr.splitlines() if line.strip()] in ([], warnings)


def test_orbax_echoes_are_dropped_and_nothing_else(monkeypatch):
    """What a failed read leaves (collected at any moment, even at exit): its pending
    coroutines raise again from close() (sys.unraisablehook), and asyncio logs their
    futures' exceptions as never retrieved. Others' pass."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    attempt_restore(lambda: None)  # installs the filter in front of the hook above
    namespace = {}
    exec(compile("async def read():\n    pass\n", "/x/orbax/checkpoint/s.py", "exec"), namespace)
    ours, theirs = namespace["read"](), _coroutine()
    for thing in (ours, theirs):
        sys.unraisablehook(types.SimpleNamespace(exc_value=Exception("x"), object=thing))
        thing.close()
    assert [info.object for info in seen] == [theirs]
    never = "_GatheringFuture exception was never retrieved\nfuture: <... See full TensorStore"
    asyncio_log = logging.getLogger("asyncio")
    record = lambda msg: logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, (), None)
    assert not asyncio_log.filter(record(never))
    assert asyncio_log.filter(record("Task exception was never retrieved: <Task coro=mine()>"))


async def _coroutine():
    pass


# -- convert: --out whole or not at all -----------------------------------------------------------


# `muonjax convert ARGS` blocked in C at convert.<HOOK> (the open() of a FIFO no one
# writes, as an XLA compilation blocks: a Python handler would not run), after it
# has written into the partial folder; it touches READY there.
@pytest.mark.parametrize("direction", ["to_hf", "from_hf"])
def test_a_convert_stopped_by_sigterm_leaves_nothing_and_runs_again(
    direction, stored, hf_dir, corpus, tmp_path
):
    out = tmp_path / "out"
    if direction == "to_hf":
        args, hook = ["convert", "--to-hf", stored, "--out", out], "to_hf"
    else:
        args = ["convert", "--from-hf", hf_dir, "--data", corpus, "--out", out]
        hook = "record_out"  # after the run of 0 steps, before the rename

    def half_written():  # while it is blocked: its partial folder, and nothing else of it
        assert [p.name[:13] for p in tmp_path.iterdir() if p.name.startswith(".")] == [
            ".out.partial-"
        ]

    code, stderr = signal_while_blocked(
        tmp_path, "muonjax.train.convert", hook, signal.SIGTERM, args, before=half_written
    )
    assert code == 128 + signal.SIGTERM, stderr
    assert stderr == ["muonjax convert: SIGTERM received: stopped; nothing was written"]
    assert list(tmp_path.iterdir()) == []
    code, _, err = _cli(*args)  # the same command again
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_kill_9_leftover_never_blocks_the_next_convert(stored, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its process id is free now: what it left is a leftover
    leftover = tmp_path / f".hf.partial-{gone.pid}-1"
    (leftover / "hf").mkdir(parents=True)
    (leftover / "hf" / "model-00001-of-00002.safetensors").write_bytes(b"half")
    running = tmp_path / ".hf.partial-1-1"  # process 1 is alive: its convert goes on
    running.mkdir()
    code, out, err = _cli("convert", "--to-hf", stored, "--out", tmp_path / "hf")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.partial-1-1", "hf"]
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("direction", ["--to-hf", "--from-hf"])
def test_out_problems_are_found_before_any_work(stored, hf_dir, tmp_path, monkeypatch, direction):
    monkeypatch.setattr(convert, "load_model", _never)
    monkeypatch.setattr(convert, "hf_to_run_config", _never)
    source = stored if direction == "--to-hf" else hf_dir
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    code, _, err = _cli("convert", direction, source, "--out", link)
    assert code == 2 and len(err) == 1, err
    assert f"--out {link}: {link} is a symbolic link to {tmp_path / 'nowhere'}" in err[0]
    (tmp_path / "exists").mkdir()
    code, _, err = _cli("convert", direction, source, "--out", tmp_path / "exists")
    assert code == 2 and "exists; convert writes a new directory" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "link"]
