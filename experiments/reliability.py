"""Reliability: how `muonjax train` recovers from failures, by real subprocess trials.

    python experiments/reliability.py            # 12 kill -9 + 12 signal trials, bad and untrusted inputs
    python experiments/reliability.py --quick    # 2 + 2 trials of 12 steps (dense model), bad inputs, 6 untrusted

One run (the default `tiny` model on the CPU, 20 files of the standard library,
batch 4 x 32, a checkpoint every 5 of 40 steps) is trained straight through once:
the reference. Then, each into a fresh --out:

- kill9: the run is SIGKILLed at a random moment and the same command relaunched
  with --resume-if-exists until it exits 0 (at most 3 times); passed when the
  final checkpoint's state and metrics.jsonl's losses (and eval losses) are
  bit-identical to the reference's.
- signal: SIGTERM and SIGINT in turn at a random moment: passed when it exits
  within 60 s with 75 (one stderr line, no traceback, the stopped step
  checkpointed) or, if the run had logged its last step, 0 (nothing on stderr),
  and the relaunch then ends bit-identical to the reference as above. During
  start-up (Python importing JAX, before --out exists) the default actions
  apply: passed when nothing was written. Twice, in full test-suite runs on a
  loaded 2-core machine, a SIGTERM sent there did not end the process: it ran
  on and exited 0 (cause not found: SIGTERM is not ignored or caught there);
  such a trial is recorded as `ran_on`, counted in the summary, and passes
  only if the run ended complete and bit-identical, as a relaunch would.
- bad_inputs: invocations that must exit 2 within 60 s with one stderr line and
  no traceback, writing nothing (run in an empty folder, --out inside it).
- untrusted: hostile and damaged shards, Hugging Face checkpoints, model
  configs and generation requests, and signals during tokenize, convert and a
  slow set-up (experiments/untrusted.py): each trial's command, exit code,
  stderr, what it left and its peak RSS.

Moments, from --seed: trials 0, 2, 3, 5, ... draw a delay from the start of the
process up to 1.1x the reference's wall time (start-up, training, saves); trials
1, 4, 7, ... one after the final step's metrics line, up to the reference's time
from there to its exit (the final eval, checkpoint, metrics and TensorBoard
flush). Each trial records where the signal landed: start-up (no --out yet),
set-up (--out, no step logged), training, final flush, or exited (none sent).
Writes results/reliability/results.json (--quick: results/reliability/scratch/).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import common
import numpy as np
import untrusted

NAME = "reliability"
CMD = [sys.executable, "-m", "muonjax", "train", "--no-progress"]
EXIT_PREEMPTED, EXIT_USAGE = 75, 2
EXIT_TIMEOUT_S = 60  # after a signal; and a bad input's whole run
RUN_TIMEOUT_S = 600  # a whole (re)launch
MAX_RELAUNCHES = 3
FINAL_EVERY = 3  # trials 1, 4, 7, ... are aimed at the final flush
# each after the run's own flags (the later wins), in an empty folder with --out run;
# "--resume" into an empty existing run/
BAD_INPUTS = [
    "--seed 4294967296", "--seed -1", "--mesh data=\u00b2", "--mesh data=2,data=4",
    "--learning-rate inf", "--learning-rate nan", "--weight-decay inf", "--eval-batches 0",
    "--cpu-devices 100000", "--out gs://bucket/run", "--steps -1",
    "--batch-size 3 --cpu-devices 2", "--data /nonexistent", "--resume", "--frobnicate",
    "--model '{bad json'", "--model-config /nonexistent.json",
]  # fmt: skip


def run_args(corpus: str, steps: int, every: int, quick: bool = False) -> list[str]:
    # --quick: `tiny` cut to its dense layer, which compiles in half the time of its MoE
    model = ["--model", "n_layers=1,first_k_dense=1"] if quick else []
    return ["--data", corpus, "--steps", str(steps), "--batch-size", "4", "--seq-len", "32",
            "--log-every", "1", "--eval-every", str(steps // 2), "--checkpoint-every", str(every),
            "--warmup-steps", "2", *model]  # fmt: skip


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def last_logged_step(out: pathlib.Path) -> int | None:
    """The last step with a loss in metrics.jsonl as it is now (a torn line skipped)."""
    last = None
    try:
        for line in (out / "metrics.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            last = record["step"] if "loss" in record else last
    except FileNotFoundError:
        pass
    return last


def listing(folder: pathlib.Path) -> list[str] | None:
    try:
        return sorted(p.name for p in folder.iterdir())
    except OSError:
        return None


def where(out: pathlib.Path, steps: int) -> dict:
    """Where a live run stands: start-up (no --out yet), set-up (--out, no step
    logged), training, or final flush (the last step logged); what --out and its
    checkpoints/ hold, and whether a checkpoint save is in flight (orbax's tmp)."""
    last, checkpoints = last_logged_step(out), listing(out / "checkpoints")
    phase = "training" if last is not None else "start-up" if not out.exists() else "set-up"
    phase = "final flush" if last == steps else phase
    return {"phase": phase, "last_logged_step": last, "out_files": listing(out),
            "checkpoints": checkpoints, "saving": any("tmp" in n for n in checkpoints or [])}  # fmt: skip


def logged_losses(out: pathlib.Path) -> list:
    from muonjax.train import read_metrics

    return [
        (r["step"], k, r[k]) for r in read_metrics(out) for k in ("loss", "eval_loss") if k in r
    ]


def state_leaves(out: pathlib.Path, step: int) -> list[np.ndarray]:
    import jax
    import orbax.checkpoint as ocp

    path = (out / "checkpoints" / str(step) / "state").absolute()
    return [np.asarray(x) for x in jax.tree.leaves(ocp.StandardCheckpointer().restore(path))]


def compare(out: pathlib.Path, reference: dict, steps: int) -> str | None:
    """None when the run's losses and final state are bit-identical to the reference's, else why not."""
    try:
        losses = logged_losses(out)
        if losses != reference["losses"]:
            first = next((a for a, b in zip(losses, reference["losses"]) if a != b), None)
            return f"metrics.jsonl losses differ from the reference's (first: {first})"
        leaves = state_leaves(out, steps)
    except Exception as e:  # a damaged run is a finding, not a crash of the harness
        return f"{type(e).__name__}: {e}"
    same = len(leaves) == len(reference["leaves"]) and all(
        np.array_equal(a, b) for a, b in zip(leaves, reference["leaves"])
    )
    return None if same else "final checkpoint state differs from the reference's"


def relaunch(command: list[str]) -> list[dict]:
    """The same command again until it exits 0, at most MAX_RELAUNCHES times."""
    runs = []
    for _ in range(MAX_RELAUNCHES):
        try:
            done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, timeout=RUN_TIMEOUT_S)  # fmt: skip
            code, err = done.returncode, stderr_lines(done.stderr)
        except subprocess.TimeoutExpired:
            code, err = "timeout", []
        runs.append({"exit_code": code, **({"stderr": err[-5:]} if code != 0 else {})})
        if code == 0:
            break
    return runs


def hit(command, out, sig, trigger, delay, steps, log) -> dict:
    """Starts `command`, sends `sig` `delay` s after its start (trigger "start") or
    after its final step's metrics line ("final"), and waits for it to exit."""
    with open(log, "w") as stderr:
        start = time.monotonic()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        at = start + delay if trigger == "start" else None
        while proc.poll() is None and time.monotonic() - start < RUN_TIMEOUT_S:
            if at is None and last_logged_step(out) == steps:
                at = time.monotonic() + delay
            if at is not None and time.monotonic() >= at:
                break
            time.sleep(0.005 if at is None or at - time.monotonic() < 0.05 else 0.02)
        record = {"trigger": trigger, "delay_s": round(delay, 3)}
        if proc.poll() is not None:
            record["phase"] = "exited"  # before the signal: none sent
        else:
            record.update(where(out, steps))
            proc.send_signal(sig)
        sent = time.monotonic()
        record["sent_at_s"] = round(sent - start, 3)
        try:
            record["exit_code"] = proc.wait(timeout=EXIT_TIMEOUT_S)
            record["hung"] = False
        except subprocess.TimeoutExpired:
            proc.kill()
            record["exit_code"], record["hung"] = proc.wait(), True
        record["exit_after_s"] = round(time.monotonic() - sent, 3)
    record["stderr"] = stderr_lines(pathlib.Path(log).read_text())
    return record


def reference_run(command: list[str], out: pathlib.Path, steps: int) -> dict:
    """The run straight through: its wall time, the time from its final step's
    metrics line to its exit, its losses and final state."""
    start, final_at = time.monotonic(), None
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        while proc.poll() is None:
            if final_at is None and last_logged_step(out) == steps:
                final_at = time.monotonic()
            time.sleep(0.005)
        end = time.monotonic()
        stderr.seek(0)
        err = stderr.read()
    if proc.returncode != 0 or final_at is None:
        sys.exit(f"reliability: the reference run failed ({proc.returncode}): {err}")
    return {"wall_s": end - start, "flush_s": end - final_at, "stderr": stderr_lines(err),
            "losses": logged_losses(out), "leaves": state_leaves(out, steps)}  # fmt: skip


def trial(i, kind, sig, command, out, steps, reference, rng, tmp) -> dict:
    trigger = "final" if i % FINAL_EVERY == 1 else "start"
    span = reference["flush_s"] if trigger == "final" else 1.1 * reference["wall_s"]
    record = {"trial": i, "signal": sig.name}
    record.update(hit(command, out, sig, trigger, rng.uniform(0, span), steps, tmp / "stderr"))
    failures = []
    record["ran_on"] = False
    if kind == "signal" and record["phase"] == "start-up":
        # Python is still importing JAX: the trainer's handlers are not installed yet, and
        # the default actions apply (SIGTERM ends it, SIGINT is a KeyboardInterrupt); all
        # that is asked is that nothing was written, so that the relaunch starts afresh,
        # or (seen under load, see the docstring) that the run went on to a whole end
        record["ran_on"] = record["exit_code"] == 0
        if out.exists() and not record["ran_on"]:
            failures.append(f"{sig.name} during start-up left {listing(out)}")
    elif kind == "signal" and record["phase"] != "exited":
        # the last step logged, or being taken: the run finishes it and exits 0 (or stops
        # with 75 if it checks the signal first); which one depends on a few ms under load
        finished = record["phase"] == "final flush" or record["last_logged_step"] == steps - 1
        code, lines = record["exit_code"], record["stderr"]
        if record["hung"]:
            failures.append(f"no exit {EXIT_TIMEOUT_S} s after {sig.name}")
        if code == EXIT_PREEMPTED:
            said = len(lines) == 1 and " received" in lines[0] and ": stopped" in lines[0]
            after = said and "stopped after step " in lines[0]  # else before training: no save
            stopped = lines[0].split("after step ")[1].split()[0] if after else None
            if not said:
                failures.append(f"{len(lines)} stderr lines, expected 1 saying where it stopped")
            elif after and not (out / "checkpoints" / stopped).is_dir():
                failures.append(f"no checkpoint of the stopped step {stopped}")
        elif code == 0 and finished:
            if lines:
                failures.append(f"{len(lines)} stderr lines after exit 0")
        else:
            failures.append(f"exit {code}, expected {EXIT_PREEMPTED}" + (" or 0" * finished))
        if any("Traceback" in line for line in lines):
            failures.append("a traceback on stderr")
    elif record["phase"] == "exited" and record["exit_code"] != 0:
        failures.append(f"exit {record['exit_code']} without a signal")
    record["relaunches"] = relaunch(command)
    if record["relaunches"][-1]["exit_code"] != 0:
        failures.append(f"no exit 0 in {MAX_RELAUNCHES} relaunches")
    record["identical"] = (why := compare(out, reference, steps)) is None
    if why:
        failures.append(why)
    record["failures"], record["passed"] = failures, not failures
    return record


def bad_input(case: str, base: list[str], tmp: pathlib.Path) -> dict:
    args, cwd = shlex.split(case), pathlib.Path(tempfile.mkdtemp(dir=tmp))
    if args == ["--resume"]:
        (cwd / "run").mkdir()
    before = set(cwd.rglob("*"))
    try:
        done = subprocess.run([*CMD, "--out", "run", *base, *args], cwd=cwd, text=True,
                              capture_output=True, timeout=EXIT_TIMEOUT_S)  # fmt: skip
        code, lines = done.returncode, stderr_lines(done.stderr)
    except subprocess.TimeoutExpired:
        code, lines = "timeout", []
    wrote = sorted(str(p.relative_to(cwd)) for p in set(cwd.rglob("*")) - before)
    traceback = any("Traceback" in line for line in lines)
    return {"args": args, "exit_code": code, "stderr_lines": len(lines), "stderr": lines[-5:],
            "wrote": wrote, "passed": code == EXIT_USAGE and len(lines) == 1 and not wrote
            and not traceback}  # fmt: skip


def untrusted_trials(args, tmp: pathlib.Path) -> list[dict]:
    """The untrusted-input trials chosen by --untrusted (--quick: untrusted.QUICK)."""
    names = args.untrusted
    if names is None:
        names = untrusted.QUICK if args.quick else [t.name for t in untrusted.TRIALS]
    chosen = [t for t in untrusted.TRIALS if t.name in names]
    if not chosen:
        return []
    fixtures = untrusted.make_fixtures(tmp / "fixtures", tmp / "corpus")
    records = []
    for trial in chosen:
        r = untrusted.run_trial(trial, fixtures, tmp / "untrusted")
        records.append(r)
        print(f"untrusted {r['surface']:22s} {r['name']:36s} exit {r['exit_code']!s:7s} "
              f"{r['peak_rss_mib']:6.0f} MiB "
              f"{'ok' if r['passed'] else 'FAILED: ' + '; '.join(r['failures'])}", flush=True)  # fmt: skip
    return records


def summarize(kill9: list, signals: list, bad: list, hostile: list) -> dict:
    def by(records, key):
        values = sorted({str(r[key]) for r in records})
        return {v: {"passed": sum(r["passed"] for r in records if str(r[key]) == v),
                    "trials": sum(str(r[key]) == v for r in records)} for v in values}  # fmt: skip

    return {
        "kill9": {"identical": sum(r["identical"] for r in kill9), "trials": len(kill9),
                  "by_phase": by(kill9, "phase")},
        "signal": {"handled": sum(r["passed"] for r in signals), "trials": len(signals),
                   "by_signal": by(signals, "signal"), "by_phase": by(signals, "phase"),
                   "ran_on_after_start_up_signal": sum(r["ran_on"] for r in signals)},
        "bad_inputs": {"passed": sum(r["passed"] for r in bad), "tried": len(bad)},
        "untrusted": {"passed": sum(r["passed"] for r in hostile), "tried": len(hostile),
                      "by_expect": by(hostile, "expect"),
                      "hung": sum(r["hung"] for r in hostile),
                      "tracebacks": sum(r["traceback"] for r in hostile),
                      "peak_rss_mib": max((r["peak_rss_mib"] for r in hostile), default=None)},
        "all_passed": all(r["passed"] for r in kill9 + signals + bad + hostile),
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 steps, 2 + 2 trials (~2 min)")
    parser.add_argument("--trials-kill9", type=int, help="default 12 (--quick: 2)")
    parser.add_argument("--trials-signal", type=int, help="default 12 (--quick: 2)")
    parser.add_argument("--bad-inputs", type=int, help="the first N bad inputs (default all)")
    parser.add_argument(
        "--untrusted",
        nargs="*",
        metavar="NAME",
        help="these untrusted-input trials (default: all; --quick: a few; none given: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="of the trials' moments")
    parser.add_argument("--out-dir", "--out", dest="out", help="default results/reliability")
    args = parser.parse_args(argv)
    out_dir = args.out or common.ROOT / "results" / NAME / ("scratch" if args.quick else "")
    steps, every = (12, 3) if args.quick else (40, 5)
    default = lambda n: n if n is not None else 2 if args.quick else 12  # noqa: E731
    n_kill9, n_signal = default(args.trials_kill9), default(args.trials_signal)
    rng, started = np.random.default_rng(args.seed), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="muonjax-reliability-") as scratch:
        tmp = pathlib.Path(scratch)
        from muonjax.train.corpus import load_corpus

        (tmp / "corpus").mkdir()
        for i, text in enumerate(load_corpus().texts[:20]):
            (tmp / "corpus" / f"doc{i:02d}.py").write_text(text)
        base = run_args(str(tmp / "corpus"), steps, every, args.quick)
        command = lambda out: [*CMD, "--out", str(out), "--resume-if-exists", *base]  # noqa: E731
        reference = reference_run(command(tmp / "reference"), tmp / "reference", steps)
        print(f"reference: {steps} steps in {reference['wall_s']:.1f} s, the last "
              f"{reference['flush_s']:.2f} s after the last step's log line", flush=True)  # fmt: skip
        records = {"kill9": [], "signal": []}
        plan = [("kill9", i, signal.SIGKILL) for i in range(n_kill9)]
        plan += [("signal", i, (signal.SIGTERM, signal.SIGINT)[i % 2]) for i in range(n_signal)]
        for kind, i, sig in plan:
            out = tmp / f"{kind}-{i}"
            r = trial(i, kind, sig, command(out), out, steps, reference, rng, tmp)
            records[kind].append(r)
            shutil.rmtree(out, ignore_errors=True)
            print(f"{kind:6s} {i:2d} {r['signal']:7s} {r['trigger']:5s} +{r['delay_s']:6.2f} s "
                  f"{r['phase']:11s} step {r.get('last_logged_step')!s:4s} "
                  f"{'saving ' if r.get('saving') else ''}exit {r['exit_code']} "
                  f"{'ran on ' if r['ran_on'] else ''}"
                  f"relaunches {len(r['relaunches'])} identical {r['identical']} "
                  f"{'ok' if r['passed'] else 'FAILED: ' + '; '.join(r['failures'])}", flush=True)  # fmt: skip
        bad = [bad_input(case, base, tmp) for case in BAD_INPUTS[: args.bad_inputs]]
        for r in bad:
            print(f"bad    {shlex.join(r['args']):36s} exit {r['exit_code']} "
                  f"{r['stderr_lines']} stderr line(s) {'ok' if r['passed'] else 'FAILED'}")  # fmt: skip
        hostile = untrusted_trials(args, tmp)
    s = summarize(records["kill9"], records["signal"], bad, hostile)
    by_signal = ", ".join(
        f"{k} {v['passed']}/{v['trials']}" for k, v in s["signal"]["by_signal"].items()
    )
    print(
        f"\nkill -9:    {s['kill9']['identical']}/{s['kill9']['trials']} bit-identical after relaunch"
    )
    ran_on = s["signal"]["ran_on_after_start_up_signal"]
    print(f"signal:     {s['signal']['handled']}/{s['signal']['trials']} handled ({by_signal})"
          + (f"; {ran_on} ran on after a start-up signal" if ran_on else ""))  # fmt: skip
    print(f"bad inputs: {s['bad_inputs']['passed']}/{s['bad_inputs']['tried']} exit 2 cleanly")
    print(f"untrusted:  {s['untrusted']['passed']}/{s['untrusted']['tried']} as expected")
    versions = {
        p: importlib.metadata.version(p) for p in ("jax", "orbax-checkpoint", "tensorboardX")
    }
    git = ["git", "describe", "--always", "--dirty"]
    versions["muonjax"] = subprocess.run(
        git, cwd=common.ROOT, capture_output=True, text=True
    ).stdout.strip()
    config = {"command": [*CMD[1:], "--out", "OUT", "--resume-if-exists", *base], "steps": steps,
              "checkpoint_every": every, "seed": args.seed, "trials_kill9": n_kill9,
              "trials_signal": n_signal, "exit_timeout_s": EXIT_TIMEOUT_S,
              "max_relaunches": MAX_RELAUNCHES, "final_every": FINAL_EVERY, "cpus": os.cpu_count(),
              "python": sys.version.split()[0]}  # fmt: skip
    path = common.write_results(out_dir, {
        "quick": args.quick, "config": config, "versions": versions, "summary": s,
        "reference": {k: reference[k] for k in ("wall_s", "flush_s", "stderr")},
        "kill9": records["kill9"], "signal": records["signal"], "bad_inputs": bad,
        "untrusted": hostile,
        "wall_time_s": time.monotonic() - started})  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
