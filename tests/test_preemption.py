"""Preemption: SIGTERM / SIGINT finish the step, checkpoint, exit 75; --resume
(or --resume-if-exists, the same command relaunched) continues bit-identically.
While the run sets up (until its first step is done) a signal ends it at once,
exit 75, with nothing to save, even where the process is blocked in C."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import DENSE, signal_while_blocked

from muonjax.cli import EXIT_PREEMPTED
from muonjax.train import read_metrics
from muonjax.train.corpus import load_corpus

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

CMD = [sys.executable, "-m", "muonjax", "train", "--no-progress"]


def _corpus(folder):
    folder.mkdir()
    for i, text in enumerate(load_corpus().texts[:20]):
        (folder / f"doc{i:02d}.py").write_text(text)
    return str(folder)


def _losses(out):
    return [(m["step"], m["loss"]) for m in read_metrics(out) if "loss" in m]


def _state(out, step):
    path = os.path.abspath(f"{out}/checkpoints/{step}/state")
    return [
        np.asarray(x)
        for x in __import__("jax").tree.leaves(ocp.StandardCheckpointer().restore(path))
    ]


def test_sigterm_checkpoints_and_the_same_command_resumes_bit_identically(tmp_path):
    data = _corpus(tmp_path / "corpus")
    args = ["--data", data, "--model", DENSE, "--steps", "30", "--batch-size", "4", "--seq-len", "32",
            "--log-every", "1", "--eval-every", "100", "--checkpoint-every", "1000",
            "--warmup-steps", "2"]  # fmt: skip
    out = tmp_path / "preempted"
    command = [*CMD, "--out", str(out), "--resume-if-exists", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(_losses(out)) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SIGTERM received: stopped after step" in lines[0], stderr
    assert "--resume" in lines[0]
    stopped = int(lines[0].split("after step ")[1].split()[0])
    assert 5 <= stopped < 30
    # nothing lost: the checkpoint is the last step done, and the log ends there
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [stopped]
    assert _losses(out)[-1][0] == stopped

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resumed from step {stopped}" in again.stdout
    whole = subprocess.run(
        [*CMD, "--out", str(tmp_path / "whole"), "--resume-if-exists", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert whole.returncode == 0, whole.stderr
    assert "resumed" not in whole.stdout  # nothing there: --resume-if-exists starts fresh
    assert _losses(out) == _losses(tmp_path / "whole")
    for a, b in zip(_state(out, 30), _state(tmp_path / "whole", 30), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_second_signal_aborts_at_once():
    code = (
        "import os, signal, time\n"
        "from muonjax.train.preemption import StopOnSignal\n"
        "with StopOnSignal() as s:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.5)\n"
        "    assert s.received == signal.SIGINT and s.stop_requested()\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "print('not aborted')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "not aborted" not in result.stdout
    assert result.stderr.strip() == "muonjax train: second SIGTERM: aborting"


def test_sigint_while_the_last_files_are_flushed_finishes_the_run(tmp_path):
    """The last step is done and logged; the final checkpoint, metrics and
    TensorBoard files are being written when the signal comes (where SIGINT
    used to print a traceback, or hang in tensorboardX's close). The run is
    complete: it finishes them, exits 0, prints nothing on stderr, and its
    final checkpoint equals that of a run left alone."""
    data = _corpus(tmp_path / "corpus")
    args = ["--data", data, "--model", DENSE, "--steps", "6", "--batch-size", "4", "--seq-len", "32",
            "--log-every", "1", "--eval-every", "6", "--checkpoint-every", "1000",
            "--warmup-steps", "2"]  # fmt: skip
    out = tmp_path / "signalled"
    proc = subprocess.Popen(
        [*CMD, "--out", str(out), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # the final eval line: after it, flushes
        if (out / "metrics.jsonl").exists() and "eval_loss" in (out / "metrics.jsonl").read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)  # hangs, if it does, here
    assert proc.returncode == 0, stderr
    assert stderr.strip() == ""
    whole = subprocess.run(
        [*CMD, "--out", str(tmp_path / "whole"), *args], capture_output=True, text=True, timeout=300
    )
    assert whole.returncode == 0, whole.stderr
    assert _losses(out) == _losses(tmp_path / "whole")
    for a, b in zip(_state(out, 6), _state(tmp_path / "whole", 6), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_signal_while_the_run_sets_up_ends_it_at_once(tmp_path):
    """Fresh: blocked before anything is written (building the program), SIGTERM
    exits 75 with one line, leaves no trace, and the same command starts the run.
    Resumed: blocked after set-up (config.json written, before the batches),
    SIGINT exits 75 with one line naming the step and the command that
    continues, which does."""
    data = _corpus(tmp_path / "corpus")
    args = ["--data", data, "--model", DENSE, "--steps", "2", "--batch-size", "4", "--seq-len", "32",
            "--warmup-steps", "1"]  # fmt: skip
    out = tmp_path / "run"
    command = ["--out", str(out), "--resume-if-exists", *args]
    code, lines = signal_while_blocked(
        tmp_path,
        "muonjax.train.loop",
        "build",
        signal.SIGTERM,
        ["train", "--no-progress", *command],
    )
    assert code == EXIT_PREEMPTED, lines
    assert lines == [
        "muonjax train: SIGTERM received while the run set up: stopped, nothing to save; run "
        "the same command again with --resume-if-exists"
    ]
    assert not out.exists()  # the run lock's file and the folder it made are gone
    again = subprocess.run([*CMD, *command], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed" not in again.stdout and _losses(out)[-1][0] == 2

    longer = ["--out", str(out), "--resume", "--steps", "4"]
    code, lines = signal_while_blocked(
        tmp_path,
        "muonjax.train.loop",
        "_train_batches",
        signal.SIGINT,
        ["train", "--no-progress", *longer],
    )
    assert code == EXIT_PREEMPTED, lines
    assert lines == [
        "muonjax train: SIGINT received while the run set up: stopped before step 3 of 4, "
        f"nothing to save; continue with: muonjax train --out {out} --resume"
    ]
    again = subprocess.run([*CMD, *longer], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed from step 2" in again.stdout and _losses(out)[-1][0] == 4
