"""Newton-Schulz in bfloat16 against float32 (issue 25.4): does `--ns-dtype bfloat16` change the loss?

    python experiments/ns_dtype.py            # 6 runs (2 dtypes x seeds 0, 1, 2), ~10 min on 2 idle cores
    python experiments/ns_dtype.py --quick    # toy sizes, 2 seeds, end to end in under a minute

The same Muon run (the Moonlight recipe: Adjusted LR, rms_scale 0.2, weight
decay 0.1, lr 1e-2) with Muon's Newton-Schulz iterations in float32 and in
bfloat16 (`--ns-dtype`: matmul inputs bfloat16, float32 accumulation and
coefficients), at seeds 0, 1 and 2 (initialization and data order; a seed's
two runs differ only in the NS dtype). The model and data are
experiments/update_rms.py's CPU setting, its Muon lr: a dense 4-layer model,
d_model 128, MHA 4 x 32, SwiGLU 512, byte-level on the Python standard
library's source, 240 steps of 16 x 128 tokens, cosine with 15 warmup steps,
float32 activations; about 95 s per run on one idle CPU device (3-6 min
while other jobs shared the 2 cores). Seed 0 in float32 is update_rms.py's
`muon-moonlight` run again.

Per run: the final train loss (the last logged step's), the mean train loss
of the last 10% of logged steps (tail) and the final eval loss (8 batches of
the held-out text). Per dtype: mean and sample std (ddof 1) over the seeds;
bf16 - f32 of the means and the paired differences per seed.

Verdict rule, per metric: "no difference beyond seed noise" when
|mean(bf16) - mean(f32)| <= max(std_f32, std_bf16), the larger per-dtype
sample std over seeds; otherwise the difference is stated with its ratio to
that std. Beside it, the paired t statistic mean(d) / (std(d) / sqrt(n)) of
the per-seed differences d, against the two-sided 95% t quantile (4.30 for 3
seeds): whether the seeds agree on a (possibly smaller) systematic shift.

Resumable: results.json is rewritten after every run, and a run recorded
there with the same config (same mode) is not retrained on a restart.
Writes results/ns_dtype/results.json and README.md (the table and verdicts).
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import tempfile
import time

import common
import numpy as np
import sweep

NAME = "ns_dtype"

DTYPES = ("float32", "bfloat16")
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0, 1)  # two, so that a sample std exists


def cpu_base(quick: bool) -> dict:
    """update_rms.py's old CPU setting: dense, MLP 4 d_model, full MHA, bytes of the stdlib."""
    if quick:
        model = dict(d_model=32, n_layers=1, first_k_dense=1, intermediate_size=128, n_heads=2,
                     attention="mha", head_dim=16)  # fmt: skip
        return dict(preset="tiny", model=model, steps=4, batch_size=8, seq_len=32,
                    learning_rate=3e-3, weight_decay=0.1, warmup_steps=1, eval_batches=1)  # fmt: skip
    model = dict(d_model=128, n_layers=4, first_k_dense=4, intermediate_size=512, n_heads=4,
                 attention="mha", head_dim=32)  # fmt: skip
    return dict(preset="tiny", model=model, steps=240, batch_size=16, seq_len=128,
                learning_rate=3e-3, weight_decay=0.1, warmup_steps=15, eval_batches=8)  # fmt: skip


LEARNING_RATE = 1e-2  # update_rms.py's Muon rate (AdamW's best there)
METRICS = ("eval_loss", "train_loss", "train_loss_tail")
# two-sided 95% quantile of Student's t with n - 1 degrees of freedom, by n - 1
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}


def seeds(quick: bool) -> tuple[int, ...]:
    return QUICK_SEEDS if quick else SEEDS


def run_name(dtype: str, seed: int) -> str:
    return f"{dtype}-seed{seed}"


def run_config(dtype: str, seed: int, out: str, quick: bool):
    from muonjax.train import TrainConfig

    base = {**cpu_base(quick), "learning_rate": LEARNING_RATE}
    steps = base["steps"]
    return TrainConfig(
        out=out, **base, optimizer="muon", seed=seed, ns_dtype=dtype, eval_every=steps,
        log_every=max(steps // 30, 1), checkpoint_every=steps, keep_checkpoints=1,
        progress=False, mesh=None,
    )  # fmt: skip


def _comparable(config: dict) -> str:
    """A config (TrainConfig.to_json) as today's TrainConfig writes it, without
    its folder: what decides whether a recorded run is this run."""
    from muonjax.train import TrainConfig

    return json.dumps(
        {**TrainConfig.from_json({**config, "out": "-"}).to_json(), "out": None}, sort_keys=True
    )


def train_one(config) -> dict:
    from muonjax.train import read_metrics, run

    started = time.perf_counter()
    summary = run(config, log=lambda *_: None)
    wall = time.perf_counter() - started
    metrics = read_metrics(config.out)
    logged = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    tail = [loss for _, loss in logged[-max(len(logged) // 10, 1) :]]
    return {
        "train_loss": float(summary.loss),
        "train_loss_tail": float(np.mean(tail)),
        "eval_loss": float(summary.eval_loss),
        "skipped_steps": summary.skipped_steps,
        "tokens_per_s": summary.tokens_per_s,
        "wall_time_s": wall,
        "train": {"step": [s for s, _ in logged], "loss": [v for _, v in logged]},
    }


def previous_runs(out: pathlib.Path, quick: bool) -> dict:
    path = out / "results.json"
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return old.get("runs", {}) if old.get("quick") == quick else {}


def analyse(runs: dict, seed_list) -> dict:
    """Per metric: per-dtype values (by seed), mean, sample std; bf16 - f32 of
    the means, the paired differences, the rule's threshold and the verdict."""
    n = len(seed_list)
    analysis = {}
    for metric in METRICS:
        values = {d: [runs[run_name(d, s)][metric] for s in seed_list] for d in DTYPES}
        per_dtype = {
            d: {"values": v, "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1))}
            for d, v in values.items()
        }
        paired = [b - f for f, b in zip(values["float32"], values["bfloat16"], strict=True)]
        diff = per_dtype["bfloat16"]["mean"] - per_dtype["float32"]["mean"]
        threshold = max(p["std"] for p in per_dtype.values())
        paired_std = float(np.std(paired, ddof=1))
        t = float(np.mean(paired)) / (paired_std / math.sqrt(n)) if paired_std > 0 else None
        within = abs(diff) <= threshold
        label = metric.replace("_", " ")
        if within:
            verdict = (
                f"{label}: bf16 - f32 = {diff:+.4f}, within the seeds' spread "
                f"(larger per-dtype std {threshold:.4f}): no difference beyond seed noise"
            )
        else:
            ratio = abs(diff) / threshold if threshold > 0 else math.inf
            verdict = (
                f"{label}: bf16 is {'higher' if diff > 0 else 'lower'} by {abs(diff):.4f}, "
                f"{ratio:.1f}x the larger per-dtype std ({threshold:.4f}): beyond seed noise"
            )
        analysis[metric] = {
            "per_dtype": per_dtype,
            "diff_bf16_minus_f32": diff,
            "paired_diffs": dict(zip((str(s) for s in seed_list), paired, strict=True)),
            "paired_std": paired_std,
            "paired_t": t,
            "t_95": T_95.get(n - 1),
            "paired_significant": t is not None and abs(t) > T_95.get(n - 1, math.inf),
            "threshold": threshold,
            "no_difference_beyond_seed_noise": within,
            "verdict": verdict,
        }
    return analysis


RULE = (
    "no difference beyond seed noise when |mean(bf16) - mean(f32)| <= max(std_f32, std_bf16), "
    "the larger per-dtype sample std (ddof 1) over seeds"
)


def run_cpu(args) -> dict:
    import jax

    out = pathlib.Path(args.out)
    seed_list = seeds(args.quick)
    earlier = previous_runs(out, args.quick)
    results = {
        "scale": "cpu", "quick": args.quick, "seeds": list(seed_list), "dtypes": list(DTYPES),
        "base": {**cpu_base(args.quick), "learning_rate": LEARNING_RATE},
        "rule": RULE, "runs": {}, "configs": {}, "reused_runs": [], "complete": False,
        "analysis": None, "verdict": None,
    }  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ns_dtype-") as tmp:
        for seed in seed_list:  # a seed's pair together: a partial result has whole pairs
            for dtype in DTYPES:
                name = run_name(dtype, seed)
                config = run_config(dtype, seed, str(pathlib.Path(tmp) / name), args.quick)
                saved = {**config.to_json(), "out": None}
                old = earlier.get(name)
                if old is not None and _comparable(old["config"]) == _comparable(saved):
                    r = old
                    results["reused_runs"].append(name)
                    note = " (recorded: reused)"
                else:
                    print(f"{name}: training {config.steps} steps ...", flush=True)
                    r = {**train_one(config), "config": saved}
                    note = ""
                results["runs"][name] = r
                results["configs"][name] = saved
                print(
                    f"{name}: eval loss {r['eval_loss']:.4f}, train loss {r['train_loss']:.4f} "
                    f"(tail {r['train_loss_tail']:.4f}), {r['wall_time_s']:.0f} s{note}",
                    flush=True,
                )
                common.write_results(out, results)  # after every run: the restart point
    results["analysis"] = analyse(results["runs"], seed_list)
    results["verdict"] = results["analysis"]["eval_loss"]["verdict"]
    results["complete"] = True
    results["wall_time_s"] = time.perf_counter() - started
    results["training_time_s"] = sum(r["wall_time_s"] for r in results["runs"].values())
    results["devices"] = jax.device_count()
    return results


def markdown(results: dict) -> str:
    seed_list = results["seeds"]
    a = results["analysis"]
    lines = [
        "| metric | " + " | ".join(f"seed {s}: f32 / bf16 / diff" for s in seed_list)
        + " | f32 mean +- std | bf16 mean +- std | bf16 - f32 | paired t |",
        "|---" * (len(seed_list) + 5) + "|",
    ]  # fmt: skip
    for metric in METRICS:
        m = a[metric]
        f32, bf16 = m["per_dtype"]["float32"], m["per_dtype"]["bfloat16"]
        cells = [
            f"{f:.4f} / {b:.4f} / {m['paired_diffs'][str(s)]:+.4f}"
            for s, f, b in zip(seed_list, f32["values"], bf16["values"], strict=True)
        ]
        t = "-" if m["paired_t"] is None else f"{m['paired_t']:+.2f}"
        lines.append(
            f"| {metric.replace('_', ' ')} | " + " | ".join(cells)
            + f" | {f32['mean']:.4f} +- {f32['std']:.4f} | {bf16['mean']:.4f} +- "
            f"{bf16['std']:.4f} | {m['diff_bf16_minus_f32']:+.4f} | {t} |"
        )  # fmt: skip
    return "\n".join(lines)


def readme(results: dict) -> str:
    base = results["base"]
    model = base["model"]
    a = results["analysis"]
    n = len(results["seeds"])
    return "\n".join(
        [
            "# Newton-Schulz in bfloat16 vs float32 (`experiments/ns_dtype.py`)",
            "",
            f"Muon (Moonlight recipe, lr {base['learning_rate']:g}, weight decay "
            f"{base['weight_decay']:g}) on a dense {model['n_layers']}-layer model, d_model "
            f"{model['d_model']}, {base['steps']} steps of {base['batch_size']} x "
            f"{base['seq_len']} tokens, `--ns-dtype float32` vs `--ns-dtype bfloat16`, seeds "
            f"{', '.join(map(str, results['seeds']))}"
            + (" (--quick: toy sizes)" if results["quick"] else "")
            + f"; {results['training_time_s']:.0f} s of training in all.",
            "",
            markdown(results),
            "",
            "train loss: the last logged step's; train loss tail: mean over the last 10% of "
            "logged steps; eval loss: final, on the held-out text. diff = bf16 - f32 (same seed: "
            "same initialization and data order). std: sample std over seeds (ddof 1).",
            "",
            f"Rule: {results['rule']}. Paired t = mean(diff) / (std(diff) / sqrt({n})), "
            f"against {a['eval_loss']['t_95']} (two-sided 95%, {n - 1} degrees of freedom).",
            "",
            *[f"- {a[m]['verdict']}" for m in METRICS],
            "",
        ]
    )


def main(argv=None) -> int:
    args = common.arguments(NAME, __doc__, argv)
    out = pathlib.Path(args.out)
    results = run_cpu(args)
    print()
    print(markdown(results))
    print()
    for metric in METRICS:
        print(results["analysis"][metric]["verdict"])
    print(f"\nwall time {results['wall_time_s']:.0f} s in all")
    path = common.write_results(out, results)
    (out / "README.md").write_text(readme(results))
    print(f"wrote {path} and {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sweep.start_jax()
    sys.exit(main())
