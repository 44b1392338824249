"""The trainer's memory and speed knobs, and its preemption handling.

    python experiments/bench_trainer.py [--quick] [--out DIR]

1. Gradient accumulation: `small` on one device (mesh data=1), one global
   batch (16 x 256) split into K = 1, 4, 16 micro-batches inside the step.
   Median time of the jitted Program.step over a few steps after compilation
   (the K programs timed round-robin, so that the machine's drift hits all of
   them alike), `muonjax inspect --json` peak_bytes for each K, and the largest
   difference between the parameter updates of K=1 and K=16 after one step
   from the same initialization and batch (absolute, and relative to the
   largest |update| of K=1); warmup is 0 so the first step updates.
2. bfloat16 against float32 activations: `tiny` and `small`, 200 steps each on
   the default corpus (the Python standard library), one run after the other
   in this process: tokens/s (Summary.tokens_per_s, compilation excluded), the
   final evaluation loss, and (bf16 - f32) / f32 of the evaluation loss.
3. SIGTERM: `python -m muonjax train --preset tiny` as a subprocess, signalled
   once metrics.jsonl shows a few steps: seconds from the signal to the exit,
   the exit code (75 expected), steps lost = (the last step logged before the
   signal, or the step the run says it reached, whichever is later) - the
   newest checkpoint in OUT/checkpoints (goal 0). Then `--resume` with
   --steps a few past that checkpoint (--decay-steps is fixed at the start, so
   the schedule does not change), which must exit 0 at that step.
   Repeated; median seconds and max steps lost.

--quick runs all three at toy sizes (tiny, a few steps) to check that the
script works; without --out it then writes to a temporary directory, never
over the full results. Writes OUT/results.json (default results/bench_trainer).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from muonjax.parallel import make_mesh, parse_mesh
from muonjax.train import TrainConfig, run
from muonjax.train.program import build

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "bench_trainer"
EXIT_PREEMPTED = 75

FULL = {
    "grad_accum": dict(preset="small", batch_size=16, seq_len=256, ks=(1, 4, 16), repeats=5),
    "dtype": {
        "tiny": dict(steps=200, batch_size=16, seq_len=128),
        # Muon's Newton-Schulz dominates small's step on this CPU; 8 x 128 keeps
        # 200 steps to about 4 minutes per run
        "small": dict(steps=200, batch_size=8, seq_len=128),
    },
    "sigterm": dict(batch_size=16, seq_len=128, min_steps=10, extra_steps=10, repeats=3),
}
QUICK = {
    "grad_accum": dict(preset="tiny", batch_size=4, seq_len=32, ks=(1, 4), repeats=2),
    "dtype": {"tiny": dict(steps=4, batch_size=4, seq_len=32, eval_batches=1, log_every=1)},
    "sigterm": dict(batch_size=4, seq_len=32, min_steps=3, extra_steps=2, repeats=1),
}


def peak_bytes(preset, batch_size, seq_len, ks):
    """{K: peak_bytes} from `muonjax inspect --json`, one process per K (each sets
    its device count before JAX starts), run side by side: they only compile."""
    procs = {
        k: subprocess.Popen(
            [sys.executable, "-m", "muonjax", "inspect", "--preset", preset, "--mesh", "data=1"]
            + f"--batch-size {batch_size} --seq-len {seq_len} --grad-accum {k} --json".split(),
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for k in ks
    }
    peaks = {}
    for k, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise RuntimeError(
                f"muonjax inspect --grad-accum {k} exited {proc.returncode}: {stderr[-2000:]}"
            )
        peaks[k] = json.loads(stdout.strip().splitlines()[-1])["peak_bytes"]
    return peaks


# 1. gradient accumulation -------------------------------------------------------------


def accumulation(preset, batch_size, seq_len, ks, repeats):
    peaks = peak_bytes(preset, batch_size, seq_len, ks)  # before any timing
    mesh = make_mesh(parse_mesh("data=1"), devices=jax.devices()[:1])
    base = TrainConfig(
        preset=preset, batch_size=batch_size, seq_len=seq_len, mesh="data=1", warmup_steps=0
    )
    model_config = base.model_config()
    tokens = np.random.default_rng(0).integers(
        0, model_config.vocab_size, (batch_size, seq_len + 1), dtype=np.int32
    )
    programs = {k: build(base.replace(grad_accum=k), model_config, mesh) for k in ks}
    batch = jax.device_put(tokens, programs[ks[0]].batch)

    # one initialization for all (init compiles as slowly as a step): each K
    # starts from a fresh device copy, since the step donates its state
    initial = jax.device_get(programs[ks[0]].init())
    fresh = lambda k: jax.device_put(initial, programs[k].shardings)

    # one step from the same init and batch: K=1 against the largest K
    updates, losses = {}, {}
    before = jax.tree.leaves(initial.params)
    for k in (ks[0], ks[-1]):
        state, metrics = programs[k].step(fresh(k), batch)
        after = jax.tree.leaves(jax.device_get(state.params))
        updates[k] = [np.asarray(a, np.float64) - b for a, b in zip(after, before)]
        losses[k] = float(metrics["loss"])
        del state
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(updates[ks[0]], updates[ks[-1]]))
    scale = max(float(np.max(np.abs(u))) for u in updates[ks[0]])

    # step time: compile each, then time the Ks round-robin
    states = {}
    for k in ks:
        states[k], _ = programs[k].step(fresh(k), batch)
        jax.block_until_ready(states[k])
    times = {k: [] for k in ks}
    for _ in range(repeats):
        for k in ks:
            start = time.perf_counter()
            states[k], _ = programs[k].step(states[k], batch)
            jax.block_until_ready(states[k])
            times[k].append(time.perf_counter() - start)
    del states

    rows = {
        k: {
            "micro_batch": batch_size // k,
            "step_seconds": statistics.median(times[k]),
            "step_seconds_all": times[k],
            "peak_bytes": peaks[k],
        }
        for k in ks
    }
    return {
        "preset": preset,
        "dtype": model_config.dtype,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "mesh": "data=1",
        "repeats": repeats,
        "by_grad_accum": {str(k): row for k, row in rows.items()},
        "update_difference": {
            "between": [ks[0], ks[-1]],
            "max_abs": diff,
            "max_abs_update": scale,
            "relative": diff / scale if scale else None,
            "loss": losses,
        },
    }


def print_accumulation(r):
    print(
        f"\n### Gradient accumulation: {r['preset']} ({r['dtype']}), global batch "
        f"{r['batch_size']} x {r['seq_len']}, mesh {r['mesh']}, median of {r['repeats']} steps\n"
    )
    print("| K | micro-batch | step (s) | peak memory (MiB) | peak / K=1 |")
    print("|---:|---:|---:|---:|---:|")
    rows = r["by_grad_accum"]
    first = next(iter(rows.values()))
    for k, row in rows.items():
        print(
            f"| {k} | {row['micro_batch']} | {row['step_seconds']:.3f} | "
            f"{row['peak_bytes'] / 2**20:.1f} | {row['peak_bytes'] / first['peak_bytes']:.2f} |"
        )
    d = r["update_difference"]
    a, b = d["between"]
    print(
        f"\nOne step from the same init and batch, K={a} against K={b}: max |update difference| "
        f"{d['max_abs']:.3g} (largest |update| {d['max_abs_update']:.3g}, relative {d['relative']:.3g}); "
        f"loss {d['loss'][a]:.6f} / {d['loss'][b]:.6f}"
    )
    peaks = {row["peak_bytes"] for row in rows.values()}
    if d["max_abs"] == 0.0 and len(peaks) == 1:
        print(
            "\nNote: every K gives the same peak memory and a bit-identical update: the step does "
            "not split the batch (gradient accumulation is not implemented in this tree)."
        )


# 2. bfloat16 against float32 ------------------------------------------------------------


def dtypes(tmp, setups):
    results = {}
    for preset, setup in setups.items():
        results[preset] = {"setup": setup}
        for dtype in ("float32", "bfloat16"):
            config = TrainConfig(
                out=str(pathlib.Path(tmp) / f"dtype-{preset}-{dtype}"),
                preset=preset,
                dtype=dtype,
                eval_every=setup["steps"],
                checkpoint_every=10**6,
                progress=False,
                **setup,
            )
            s = run(config, log=lambda *_: None)
            results[preset][dtype] = {
                "tokens_per_s": s.tokens_per_s,
                "eval_loss": s.eval_loss,
                "loss": s.loss,
                "wall_time_s": s.wall_time_s,
                "skipped_steps": s.skipped_steps,
            }
        f32, bf16 = results[preset]["float32"], results[preset]["bfloat16"]
        results[preset]["eval_loss_relative_difference"] = (
            bf16["eval_loss"] - f32["eval_loss"]
        ) / f32["eval_loss"]
        results[preset]["bf16_over_f32_tokens_per_s"] = bf16["tokens_per_s"] / f32["tokens_per_s"]
    return results


def print_dtypes(results):
    print("\n### bfloat16 against float32 activations (parameters and optimizer state float32)\n")
    print(
        "| preset | steps | batch | f32 tokens/s | bf16 tokens/s | bf16/f32 speed | "
        "f32 eval loss | bf16 eval loss | (bf16 - f32)/f32 |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for preset, r in results.items():
        s, f, b = r["setup"], r["float32"], r["bfloat16"]
        print(
            f"| {preset} | {s['steps']} | {s['batch_size']} x {s['seq_len']} | "
            f"{f['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | {r['bf16_over_f32_tokens_per_s']:.2f} | "
            f"{f['eval_loss']:.4f} | {b['eval_loss']:.4f} | {r['eval_loss_relative_difference']:+.3%} |"
        )


# 3. SIGTERM ----------------------------------------------------------------------------


def _logged_steps(out: pathlib.Path) -> list[int]:
    """Steps of the training lines in metrics.jsonl so far (evaluation lines and a
    line still being written are skipped)."""
    steps = []
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return steps
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def _checkpointed_step(out: pathlib.Path) -> int | None:
    """The newest complete checkpoint (orbax names it by its step; tmp folders are not digits)."""
    folder = out / "checkpoints"
    steps = (
        [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
        if folder.exists()
        else []
    )
    return max(steps, default=None)


def sigterm_once(out: pathlib.Path, batch_size, seq_len, min_steps, extra_steps, timeout=600):
    # mid-run whenever the signal comes; --decay-steps fixes the schedule's horizon
    never = 10**6
    stdout, stderr = out.parent / f"{out.name}.stdout", out.parent / f"{out.name}.stderr"
    with open(stdout, "w") as so, open(stderr, "w") as se:
        proc = subprocess.Popen(
            [sys.executable, "-m", "muonjax", "train", "--out", str(out)]
            + f"--preset tiny --steps {never} --decay-steps {never} --batch-size {batch_size} "
            f"--seq-len {seq_len} --log-every 1 --eval-every {never} --checkpoint-every {never} "
            "--no-progress".split(),
            cwd=ROOT,
            stdout=so,
            stderr=se,
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                logged = _logged_steps(out)
                if logged and max(logged) >= min_steps:
                    break
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"train exited {proc.returncode} before step {min_steps}: {stderr.read_text()[-2000:]}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"train did not reach step {min_steps} in {timeout} s")
                time.sleep(0.02)
            before = max(_logged_steps(out))
            start = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=timeout)
            seconds = time.perf_counter() - start
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    message = stderr.read_text()
    match = re.search(r"stopped after step (\d+)", message)
    reached = int(match.group(1)) if match else max(_logged_steps(out), default=before)
    saved = _checkpointed_step(out)
    lost = max(before, reached) - (saved or 0)

    target = (saved or 0) + extra_steps
    resumed = subprocess.run(
        [sys.executable, "-m", "muonjax", "train", "--out", str(out), "--resume"]
        + ["--steps", str(target), "--no-progress"],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    summary = None
    if resumed.returncode == 0:
        summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    logged = _logged_steps(out)
    return {
        "signal_to_exit_s": seconds,
        "exit_code": code,
        "last_logged_before_signal": before,
        "step_reached": reached,
        "checkpointed_step": saved,
        "steps_lost": lost,
        "stderr_last_line": message.strip().splitlines()[-1] if message.strip() else "",
        "resume_exit_code": resumed.returncode,
        "resume_target_steps": target,
        "resume_final_step": summary["steps"] if summary else None,
        # every step logged once, 1..target, after the resume trimmed the lines past the checkpoint
        "metrics_steps_contiguous": logged == list(range(1, target + 1)),
        "resume_stderr_tail": "" if resumed.returncode == 0 else resumed.stderr[-2000:],
    }


def sigterm(tmp, batch_size, seq_len, min_steps, extra_steps, repeats):
    trials = [
        sigterm_once(
            pathlib.Path(tmp) / f"sigterm-{i}", batch_size, seq_len, min_steps, extra_steps
        )
        for i in range(repeats)
    ]
    return {
        "preset": "tiny",
        "batch_size": batch_size,
        "seq_len": seq_len,
        "repeats": repeats,
        "median_signal_to_exit_s": statistics.median(t["signal_to_exit_s"] for t in trials),
        "max_steps_lost": max(t["steps_lost"] for t in trials),
        "all_exit_75": all(t["exit_code"] == EXIT_PREEMPTED for t in trials),
        "all_resumed_to_completion": all(
            t["resume_exit_code"] == 0 and t["resume_final_step"] == t["resume_target_steps"]
            for t in trials
        ),
        "trials": trials,
    }


def print_sigterm(r):
    print(
        f"\n### SIGTERM during `muonjax train --preset tiny` ({r['batch_size']} x {r['seq_len']}), "
        f"{r['repeats']} trials\n"
    )
    print(
        "| trial | signal -> exit (s) | exit code | last logged | reached | checkpointed | "
        "steps lost | resume exit | resumed to | metrics contiguous |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for i, t in enumerate(r["trials"]):
        print(
            f"| {i} | {t['signal_to_exit_s']:.2f} | {t['exit_code']} | {t['last_logged_before_signal']} | "
            f"{t['step_reached']} | {t['checkpointed_step']} | {t['steps_lost']} | "
            f"{t['resume_exit_code']} | {t['resume_final_step']} | {t['metrics_steps_contiguous']} |"
        )
    print(
        f"\nmedian signal -> exit {r['median_signal_to_exit_s']:.2f} s; max steps lost "
        f"{r['max_steps_lost']}; all exit {EXIT_PREEMPTED}: {r['all_exit_75']}; "
        f"all resumed to completion: {r['all_resumed_to_completion']}"
    )
    for i, t in enumerate(r["trials"]):
        if t["resume_stderr_tail"]:
            print(f"\ntrial {i} resume failed:\n{t['resume_stderr_tail']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, to check the script runs")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help=f"results folder (default: {RESULTS.relative_to(ROOT)}; with --quick a temporary folder)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("grad_accum", "dtype", "sigterm"),
        default=("grad_accum", "dtype", "sigterm"),
        help="run only these parts",
    )
    args = parser.parse_args()
    setups = QUICK if args.quick else FULL
    out = args.out or (
        pathlib.Path(tempfile.mkdtemp(prefix="bench_trainer-quick-")) if args.quick else RESULTS
    )
    results = {
        "quick": args.quick,
        "jax": jax.__version__,
        "devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
    }
    started = time.perf_counter()
    parts = {
        "grad_accum": lambda tmp: accumulation(**setups["grad_accum"]),
        "dtype": lambda tmp: dtypes(tmp, setups["dtype"]),
        "sigterm": lambda tmp: sigterm(tmp, **setups["sigterm"]),
    }
    printers = {"grad_accum": print_accumulation, "dtype": print_dtypes, "sigterm": print_sigterm}
    results["part_wall_time_s"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, part in parts.items():
            if name not in args.only:
                continue
            part_start = time.perf_counter()
            results[name] = part(tmp)
            results["part_wall_time_s"][name] = time.perf_counter() - part_start
            printers[name](results[name])
    results["wall_time_s"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{out / 'results.json'} ({results['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
