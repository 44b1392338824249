"""A full disk: the run stops at the first checkpoint save (or metrics write) that
fails, with one line on stderr (what failed, why, and which checkpoint is the
last complete one) and exit code 74 (EX_IOERR); it corrupts nothing (every
`checkpoints/N/` restores, metrics.jsonl is whole JSON lines), and once space
is freed the same command with --resume ends bit-identical to a run trained
straight through.

The disk fills for real: a tmpfs sized from a measured checkpoint, so that the
first checkpoints fit and a later one does not (needs root, or another right to
mount; skipped otherwise). Without root, a per-file size limit (RLIMIT_FSIZE:
writes past it fail with EFBIG, "File too large") stands in for it; as every
checkpoint has the same files, that can only make the first save fail."""

import errno
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import muonjax.cli

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

EXIT_IO = getattr(muonjax.cli, "EXIT_IO", 74)
CMD = [sys.executable, "-m", "muonjax", "train", "--no-progress"]
STEPS, EVERY = 40, 10
# A save runs in the background while the step loop goes on, so its failure shows
# some steps after the save started: here a failing save of the toy model gives up
# 50-130 ms after CheckpointManager.save returns, and a step takes about 40 ms
# (runs that poll after every step stopped 0 to 4 steps after the failed save). The
# run must stop then: at most MARGIN steps after the failed save's step, well before
# the next save is due (step + EVERY), where orbax itself would raise the error.
MARGIN = 6
PAGE = os.sysconf("SC_PAGE_SIZE")


def _args(corpus):
    return ["--data", corpus, "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "32",
            "--checkpoint-every", str(EVERY), "--log-every", "1", "--eval-every", "100",
            "--warmup-steps", "2"]  # fmt: skip


def _train(out, corpus, *extra, limit=None):
    command = [*CMD, "--out", str(out), *_args(corpus), *extra]
    env = None
    if limit is not None:
        # set by a launcher that execs the run (preexec_fn is unsafe in a threaded pytest);
        # JAX reads the compilation cache but writes no entry (one may be over the limit)
        env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1e9"}
        command = [
            sys.executable,
            "-c",
            "import os, resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a kill\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            "os.execv(sys.argv[1], sys.argv[1:])\n",
            *command,
        ]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The run trained straight through, on an ordinary disk: what a resumed run must
    equal, and the checkpoint sizes the tests size their disks from."""
    out = tmp_path_factory.mktemp("disk_full") / "whole"
    done = _train(out, corpus)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _complete(out) == [2 * EVERY, 3 * EVERY, 4 * EVERY]  # --keep-checkpoints 3
    return out


@pytest.fixture
def small_disk(tmp_path):
    """(folder, resize): a tmpfs mounted at tmp_path/disk, and resize(bytes), which
    remounts it with that size (the path stays the same). Unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={64 * PAGE}", "muonjax-disk-full", str(folder)],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip("no mount command here: the RLIMIT_FSIZE test stands in for a full disk")
    if mounted.returncode != 0:
        why = (mounted.stderr.strip().splitlines() or [f"exit code {mounted.returncode}"])[0]
        pytest.skip(
            f"cannot mount a tmpfs here ({why}; it needs root): "
            "the RLIMIT_FSIZE test stands in for a full disk"
        )

    def resize(size):
        subprocess.run(
            ["mount", "-o", f"remount,size={size}", str(folder)], check=True, capture_output=True
        )

    try:
        yield folder, resize
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _tmpfs_bytes(path):
    """What the files under `path` take on a tmpfs: whole pages (directories take none)."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in path.rglob("*") if p.is_file())


def _complete(out):
    """The checkpoints the run presents as complete: folders named by a step number alone."""
    folder = out / "checkpoints"
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
    )


def _state(out, step):
    path = (out / "checkpoints" / str(step) / "state").absolute()
    return [np.asarray(x) for x in jax.tree.leaves(ocp.StandardCheckpointer().restore(path))]


def _metrics(out):
    """metrics.jsonl's records; fails on anything but whole JSON lines."""
    text = (out / "metrics.jsonl").read_text()
    assert not text or text.endswith("\n"), f"metrics.jsonl ends in a cut line: {text[-200:]!r}"
    return [json.loads(line) for line in text.splitlines()]  # a blank or cut line raises


def _losses(out):
    return [(r["step"], r["loss"]) for r in _metrics(out) if "loss" in r]


def _check_stopped(done, out, reason):
    """The run stopped for the first save that failed (the step after its last
    complete checkpoint, or the first) with `reason` (an errno): exit code, the one
    stderr line, and nothing corrupted. Returns the last complete checkpoint's
    step (None if none is)."""
    assert done.returncode == EXIT_IO, (
        f"exit code {done.returncode}, not {EXIT_IO}; stderr: {done.stderr[-3000:]}"
    )
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"{len(lines)} lines on stderr, not one:\n" + done.stderr[-3000:]
    line = lines[0]
    # nothing corrupted: the checkpoints it presents as complete restore, in order from
    # the first, and the log is whole JSON lines with every step trained once
    complete = _complete(out)
    assert complete == [EVERY * (i + 1) for i in range(len(complete))], complete
    for step in complete:
        assert _state(out, step), step
        meta = json.loads((out / "checkpoints" / str(step) / "meta" / "metadata").read_text())
        assert meta["step"] == step
    json.loads((out / "config.json").read_text())
    trained = [step for step, _ in _losses(out)]
    assert trained == list(range(1, len(trained) + 1)), trained
    failed = EVERY * (len(complete) + 1)
    # what failed, and why (a run may also refuse a save that it sees has no room)
    assert re.search(rf"checkpoint {failed}\b|metrics|tensorboard", line), line
    assert os.strerror(reason) in line or (
        reason == errno.ENOSPC and re.search(r"no (room|space)", line, re.IGNORECASE)
    ), f"{os.strerror(reason)!r} is not in: {line}"
    # it stopped at the failure, not at the next save (failed + EVERY) or later
    assert failed <= trained[-1] <= failed + MARGIN, (
        f"trained to step {trained[-1]} after the save of {failed} failed; {line}"
    )
    # which checkpoint is the last complete one
    if complete:
        said = re.search(r"last complete checkpoint\D{0,20}?(\d+)", line, re.IGNORECASE)
        assert said and int(said.group(1)) == complete[-1], line
        return complete[-1]
    assert re.search(r"no (complete checkpoint|checkpoint is complete)", line, re.IGNORECASE), line
    return None


def _check_resumes(out, corpus, reference, resumed_from):
    """The same command with --resume completes, bit-identical to `reference`."""
    again = _train(out, corpus, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    if resumed_from is not None:
        assert f"resumed from step {resumed_from}" in again.stdout, again.stdout
    assert _losses(out) == _losses(reference)
    for a, b in zip(_state(out, STEPS), _state(reference, STEPS), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_full_disk_stops_the_run_cleanly_and_it_resumes_exactly(small_disk, corpus, reference):
    folder, resize = small_disk
    # Room for the run's other files and two and a half checkpoints: the saves at EVERY
    # and 2 * EVERY fit, the one at 3 * EVERY does not (and nothing is deleted before
    # a fourth: --keep-checkpoints 3). A run that checks the free space before a save
    # against an estimate above the real size may refuse the second one already.
    checkpoint = max(_tmpfs_bytes(p) for p in (reference / "checkpoints").iterdir())
    rest = _tmpfs_bytes(reference) - _tmpfs_bytes(reference / "checkpoints")
    size = rest + 16 * PAGE + checkpoint * 5 // 2
    resize(size)
    out = folder / "run"
    done = _train(out, corpus)
    last = _check_stopped(done, out, errno.ENOSPC)
    assert last in (EVERY, 2 * EVERY), f"{checkpoint=} {rest=} {size=}: {done.stderr}"

    resize(10 * size)  # space freed
    _check_resumes(out, corpus, reference, resumed_from=last)


def test_a_file_size_limit_fails_the_first_save_cleanly(tmp_path, corpus, reference):
    # A limit above every file the run writes outside its checkpoints (config.json,
    # metrics.jsonl, tensorboard/: measured after all STEPS, and the limited run stops
    # long before), below a file that every checkpoint has, at the same path and of
    # the same size (orbax's state/_METADATA, about 60 kB), and below its array data.
    files = [p for p in reference.rglob("*") if p.is_file()]
    other = max(p.stat().st_size for p in files if "checkpoints" not in p.parts)
    sizes = [
        {str(p.relative_to(step)): p.stat().st_size for p in step.rglob("*") if p.is_file()}
        for step in (reference / "checkpoints").iterdir()
    ]
    shared = set.intersection(*(set(s) for s in sizes))
    fixed = max(min(s[name] for s in sizes) for name in shared)
    assert fixed > other, (fixed, other)
    limit = (other + fixed) // 2
    out = tmp_path / "run"
    done = _train(out, corpus, limit=limit)
    assert _check_stopped(done, out, errno.EFBIG) is None
    _check_resumes(out, corpus, reference, resumed_from=None)
