"""One writer per run directory (issue 12, item 1): a second run on a busy --out
fails with one line and exit code 2, writing nothing; the lock dies with its run."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import DENSE

from muonjax.train.errors import ConfigError
from muonjax.train.lock import LOCK_FILE, RunLock, is_lock_file, lock_name
from muonjax.train.loop import _saved_config

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

TRAIN = [sys.executable, "-m", "muonjax", "train", "--no-progress"]
SMALL = [
    "--preset",
    "tiny",
    "--model",
    DENSE,
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--log-every",
    "1",
    "--eval-every",
    "100",
    "--warmup-steps",
    "2",
    "--decay-steps",
    "20",
]
IN_USE = "is in use by another run (pid "


def _start(*args):
    return subprocess.Popen(
        [*TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_a_holder_that_writes_its_pid_late_is_still_named(tmp_path):
    """The holder writes its pid just after it takes the lock: a run refused in
    between waits a moment for it rather than naming nobody."""
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: conflicts with ours
    late = threading.Timer(0.3, lambda: os.pwrite(fd, b"4242 elsewhere\n", 0))
    late.start()
    try:
        with pytest.raises(ConfigError, match=r"in use by another run \(pid 4242 on elsewhere\)"):
            RunLock(out).__enter__()
    finally:
        late.join()
        os.close(fd)


def _one_line_error(stderr, match):
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("muonjax: error: ") and match in lines[0], lines[0]
    return lines[0]


def _train_steps(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


# --- the lock itself, in this process (flock locks are per open file, so two
# RunLocks of one process exclude each other like two processes do)


def test_second_lock_is_refused_and_first_release_frees_it(tmp_path):
    out = tmp_path / "a" / "run"
    with RunLock(out):
        assert (out / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        with pytest.raises(ConfigError) as e:
            RunLock(out).__enter__()
        assert str(e.value) == (
            f"--out {out} is in use by another run (pid {os.getpid()}); "
            "wait for it or choose another --out"
        )
        assert _saved_config(out, resume=False) is None  # its own lock file does not count
    assert not (tmp_path / "a").exists()  # the folders it made for the lock, empty: gone
    with RunLock(out):
        pass


def test_release_leaves_what_was_there(tmp_path):
    (tmp_path / "precious.txt").write_text("keep")
    with pytest.raises(ConfigError):
        with RunLock(tmp_path):
            raise ConfigError("set-up failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_stale_lock_file_does_not_block_or_count(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("999999 elsewhere\n")  # left by a run killed -9 at start
    assert _saved_config(out, resume=False) is None
    with RunLock(out):
        pass
    assert not (out / LOCK_FILE).exists()


def test_lock_names():
    assert lock_name(0) == ".lock" and lock_name(3) == ".lock.3"
    assert is_lock_file(".lock") and is_lock_file(".lock.12")
    assert not is_lock_file(".lockfile") and not is_lock_file("config.json")


def test_out_that_is_a_file_is_left_to_set_up(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with RunLock(path):
        pass
    assert path.read_text() == "x"


# --- the command line, as users start it


def test_two_runs_started_together_one_is_refused(corpus, tmp_path):
    out = tmp_path / "run"
    common = ["--data", corpus, *SMALL, "--steps", "6", "--checkpoint-every", "3", "--out"]
    procs = [_start(*common, str(out), "--seed", str(seed)) for seed in (0, 1)]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err[-2000:]) for p, _, err in results]
    (winner, seed), (loser, _) = sorted(
        [((p, err), seed) for (p, _, err), seed in zip(results, (0, 1))],
        key=lambda x: x[0][0].returncode,
    )
    line = _one_line_error(loser[1], f"--out {out} {IN_USE}")
    assert f"(pid {winner[0].pid})" in line
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["seed"] == seed
    assert _train_steps(out) == [1, 2, 3, 4, 5, 6]
    assert not (out / LOCK_FILE).exists()


def test_resume_while_running_is_refused_and_kill_9_frees_the_lock(corpus, tmp_path):
    out = tmp_path / "run"
    args = ["--data", corpus, *SMALL, "--checkpoint-every", "2"]
    first = _start(*args, "--steps", "100000", "--out", str(out))
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "2").is_dir():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        second = subprocess.run(
            [*TRAIN, "--out", str(out), "--resume", "--steps", "4"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr
        _one_line_error(second.stderr, f"--out {out} {IN_USE}{first.pid})")
        assert first.poll() is None  # the refused run did not disturb the running one
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    assert (out / LOCK_FILE).exists()  # left behind, but no longer locked
    done = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    resumed = subprocess.run(
        [*TRAIN, "--out", str(out), "--resume", "--steps", str(done + 2)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout + resumed.stderr
    assert _train_steps(out) == list(range(1, done + 3))
    assert not (out / LOCK_FILE).exists()
