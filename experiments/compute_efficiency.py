"""Compute efficiency: Figure 1a, Figure 3 and Table 3 of "Muon is Scalable for
LLM Training" (Sec. 3.2, the scaling law of Muon).

    python experiments/compute_efficiency.py              # --scale cpu: 38 runs, 30-50 min on 2 cores
    python experiments/compute_efficiency.py --quick      # toy sizes, end to end in seconds
    python experiments/compute_efficiency.py --scale pod [--mesh data=8]   # build + inspect, no training

Dense Llama-style models (full MHA, SwiGLU of width 2.75 d_model, as the
paper's Table 2 models) at four sizes, each trained near compute-optimal
(20 tokens per non-embedding parameter; Table 2 uses 22-26) on the same data:
  1. AdamW (betas 0.9 / 0.95, weight decay 0.1) at every learning rate of
     LEARNING_RATES, extended by half-decades (common.RATE_LADDER) while a size's
     best rate is at the edge of those tried; its best per size is its
     frontier point.
  2. Muon (the Moonlight recipe: Adjusted LR, rms_scale 0.2, weight decay 0.1)
     swept the same way: at AdamW's best rate per size it is the paper's
     protocol ("we directly reused the hyper-parameters that are optimal for the
     AdamW baseline"); its own best per size is the stronger check.
  3. A second seed (initialization and data order) at each frontier point, for
     the uncertainty of everything fitted below.
Fitted per frontier: L = a C^b (least squares in log-log; C = training FLOPs,
the trainer's count: 6N plus attention, embeddings excluded as lookups). The
compute ratio is the FLOPs Muon's fit needs to reach the loss AdamW's fit gets
with C, divided by C (paper: 0.519), at the geometric middle of our compute
range; its spread is over every choice of seed per frontier point (2^8 fits).

Runs already in OUT/results.json with an identical config are reused, not
retrained, so that a sweep can be extended or finished after an interruption.
Writes results/compute_efficiency/results.json (every run, the frontiers, fits,
ratios, configs, wall times, the paper's numbers) and compute_efficiency.png
(loss vs FLOPs as Figure 3, the learning-rate sweeps). --scale pod builds the
paper's Table 2 models (399M-1.5B) with its tokens, batch sizes and learning
rates and reports parameters, FLOPs and `inspect`'s per-device peak memory.
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
import sys
import sysconfig
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "compute_efficiency"

OPTIMIZERS = ("adamw", "muon")
LEARNING_RATES = (1e-2, 3e-2, 1e-1)  # the sweep each optimizer starts from, at every size
TOKENS_PER_PARAMETER = 20  # per non-embedding parameter (Chinchilla; Table 2: 22-26)
SEEDS = (0, 1)  # the sweep runs seed 0; each frontier point is rerun with seed 1
PFLOP_S_DAY = 1e15 * 86400  # the unit of the paper's C

# The CPU sizes: dense, head_dim 8, SwiGLU 2.75 d (rounded to 8); ~16x in compute.
CPU_SIZES = {
    "d32": dict(d_model=32, n_layers=2, n_heads=4, intermediate_size=88),
    "d40": dict(d_model=40, n_layers=2, n_heads=5, intermediate_size=112),
    "d48": dict(d_model=48, n_layers=2, n_heads=6, intermediate_size=136),
    "d64": dict(d_model=64, n_layers=2, n_heads=8, intermediate_size=176),
}
QUICK_SIZES = {
    "d16": dict(d_model=16, n_layers=1, n_heads=2, intermediate_size=48),
    "d24": dict(d_model=24, n_layers=1, n_heads=3, intermediate_size=64),
}
QUICK_LEARNING_RATES = (3e-2,)

PAPER = {
    "setting": "dense Llama models 399M-1.5B (Table 2), compute-optimal tokens, AdamW "
    "grid-searched, Muon at AdamW's optimum (Sec. 3.2)",
    "fits": {  # Table 3: LM loss (seqlen 8K) = a C^b, C in PFLOP/s-days
        "muon": {"a": 2.506, "b": -0.052},
        "adamw": {"a": 2.608, "b": -0.054},
    },
    "compute_ratio": 0.519,  # Figure 1a: "0.519x FLOPs"
    # Table 3's rounded fits give 0.44 (0.3 PFLOP/s-days) to 0.49 (4, the 1.5B run): the
    # ratio is that sensitive to the exponents' third digit
    "compute_ratio_from_table3_fits": {"0.3": 0.443, "1": 0.464, "4": 0.490},
    "claim": "Muon needs about 52% of AdamW's training FLOPs to reach the same loss "
    "under compute-optimal training (about 2x more efficient)",
    "table2": {  # non-embedding params, heads, layers, hidden, tokens, lr, batch (8K sequences)
        "399M": dict(heads=12, layers=12, hidden=1536, tokens=8.92e9, lr=9.503e-4, batch=96),
        "545M": dict(heads=14, layers=14, hidden=1792, tokens=14.04e9, lr=9.143e-4, batch=128),
        "822M": dict(heads=16, layers=16, hidden=2048, tokens=20.76e9, lr=8.825e-4, batch=160),
        "1.1B": dict(heads=18, layers=18, hidden=2304, tokens=28.54e9, lr=8.561e-4, batch=192),
        "1.5B": dict(heads=20, layers=20, hidden=2560, tokens=38.91e9, lr=8.305e-4, batch=256),
    },
}


# --- the fits ---------------------------------------------------------------------------


def fit_power_law(flops, losses) -> dict:
    """L = a C^b by least squares on (log C, log L); a for C in FLOPs and in
    PFLOP/s-days (the paper's unit)."""
    b, log_a = np.polyfit(np.log(flops), np.log(losses), 1)
    return {"a": float(math.exp(log_a)), "b": float(b),
            "a_pflop_s_days": float(math.exp(log_a) * PFLOP_S_DAY**b)}  # fmt: skip


def compute_ratio(muon: dict, adamw: dict, flops: float) -> float:
    """FLOPs Muon's fit needs to reach AdamW's fitted loss at `flops`, over `flops`."""
    target = adamw["a"] * flops ** adamw["b"]
    return float((target / muon["a"]) ** (1 / muon["b"]) / flops)


def paper_compute_ratio(pflop_s_days: float) -> float:
    """The same ratio from the paper's Table 3 fits, at C in PFLOP/s-days."""
    m, a = PAPER["fits"]["muon"], PAPER["fits"]["adamw"]
    target = a["a"] * pflop_s_days ** a["b"]
    return float((target / m["a"]) ** (1 / m["b"]) / pflop_s_days)


def frontiers(runs: list[dict], sizes) -> dict:
    """Per optimizer protocol, per size, the chosen run (seed 0): AdamW's best
    rate; Muon at AdamW's best rate (the paper's protocol); Muon's own best."""

    def at(size, optimizer, lr=None):
        rs = [r for r in runs if r["size"] == size and r["optimizer"] == optimizer
              and r["seed"] == SEEDS[0] and r["eval_loss"] is not None
              and (lr is None or r["learning_rate"] == lr)]  # fmt: skip
        return min(rs, key=lambda r: r["eval_loss"])

    out = {"adamw": {}, "muon_at_adamw_lr": {}, "muon": {}}
    for size in sizes:
        best = at(size, "adamw")
        out["adamw"][size] = best
        out["muon_at_adamw_lr"][size] = at(size, "muon", best["learning_rate"])
        out["muon"][size] = at(size, "muon")
    return {
        curve: {
            size: {k: r[k] for k in ("optimizer", "learning_rate", "flops", "eval_loss")}
            for size, r in points.items()
        }  # fmt: skip
        for curve, points in out.items()
    }


def seed_losses(runs: list[dict], point: dict, size: str) -> list[float]:
    """The eval losses of a frontier point's setting over the seeds run."""
    return [
        r["eval_loss"]
        for r in runs
        if r["size"] == size
        and r["eval_loss"] is not None
        and r["optimizer"] == point["optimizer"]
        and r["learning_rate"] == point["learning_rate"]
    ]


def _tried_edges(runs: list[dict], size: str, optimizer: str) -> tuple[float, float]:
    rates = [r["learning_rate"] for r in runs if r["size"] == size and r["optimizer"] == optimizer]
    return min(rates), max(rates)


def analyse(runs: list[dict], sizes) -> dict:
    """Frontiers, fits, compute ratios (seed 0) and their spread over seeds."""
    front = frontiers(runs, sizes)
    flops = {size: front["adamw"][size]["flops"] for size in sizes}
    middle = math.exp(np.mean(np.log(list(flops.values()))))
    fits = {
        curve: fit_power_law([flops[s] for s in sizes], [p[s]["eval_loss"] for s in sizes])
        for curve, p in front.items()
    }
    result = {"frontiers": front, "fits": fits, "ratio_at_flops": middle, "curves": {}}
    for curve in ("muon_at_adamw_lr", "muon"):
        # every combination of one seed per frontier point, AdamW's and Muon's
        options = [seed_losses(runs, front["adamw"][s], s) for s in sizes] + [
            seed_losses(runs, front[curve][s], s) for s in sizes
        ]
        ratios = []
        for choice in itertools.product(*options):
            adamw = fit_power_law(list(flops.values()), choice[: len(sizes)])
            muon = fit_power_law(list(flops.values()), choice[len(sizes) :])
            ratios.append(compute_ratio(muon, adamw, middle))
        result["curves"][curve] = {
            "compute_ratio": compute_ratio(fits[curve], fits["adamw"], middle),
            "compute_ratio_per_size": {
                s: compute_ratio(fits[curve], fits["adamw"], flops[s]) for s in sizes
            },
            "loss_gap_per_size": {  # AdamW - Muon at the same size (> 0: Muon ahead)
                s: front["adamw"][s]["eval_loss"] - front[curve][s]["eval_loss"] for s in sizes
            },
            "seed_fits": len(ratios),
            "compute_ratio_seed_median": float(np.median(ratios)),
            "compute_ratio_seed_range": [float(min(ratios)), float(max(ratios))],
        }
    result["seed_spread"] = {  # |seed 1 - seed 0| at the frontier points
        curve: {s: float(np.ptp(seed_losses(runs, p[s], s))) for s in sizes}
        for curve, p in front.items()
    }
    result["best_rate_at_edge"] = {  # sizes whose best rate is the smallest or largest tried
        curve: [s for s in sizes if front[curve][s]["learning_rate"] in _tried_edges(runs, s, opt)]
        for curve, opt in (("adamw", "adamw"), ("muon", "muon"))
    }
    return result


# --- scale cpu: train -------------------------------------------------------------------


def cpu_setup(quick: bool) -> tuple[dict, dict, tuple]:
    """(sizes, the shared TrainConfig fields, learning rates)."""
    if quick:
        json_package = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "json"  # a small corpus
        base = dict(preset="tiny", batch_size=8, seq_len=32, warmup_steps=2, eval_batches=1,
                    data=(str(json_package),), validation_fraction=0.1)  # fmt: skip
        return QUICK_SIZES, base, QUICK_LEARNING_RATES
    base = dict(preset="tiny", batch_size=16, seq_len=128, warmup_steps=20, eval_batches=16)
    return CPU_SIZES, base, LEARNING_RATES


def dense_mha(model: dict) -> dict:
    """A CPU size's model fields, every layer dense, full MHA of head dim d_model / n_heads."""
    return dict(model, first_k_dense=model["n_layers"], attention="mha",
                head_dim=model["d_model"] // model["n_heads"])  # fmt: skip


def size_config(model: dict, base: dict, non_embedding: int, quick: bool) -> dict:
    """A size's TrainConfig fields: every layer dense, MHA with head_dim 8, and
    steps for TOKENS_PER_PARAMETER tokens per non-embedding parameter."""
    model = dense_mha(model)
    per_step = base["batch_size"] * base["seq_len"]
    steps = 12 if quick else round(TOKENS_PER_PARAMETER * non_embedding / per_step)
    return dict(base, model=model, steps=steps, eval_every=steps, log_every=max(steps // 20, 1),
                checkpoint_every=steps)  # fmt: skip


def non_embedding_params(preset: str, model: dict) -> int:
    from muonjax.models import param_counts
    from muonjax.train import TrainConfig

    return param_counts(TrainConfig(preset=preset, model=dense_mha(model)).model_config())[
        "total_non_embedding"
    ]


def train_one(fields: dict, out: pathlib.Path) -> dict:
    """One run's final numbers; a run that diverges (the trainer stops it) has eval_loss None."""
    from muonjax.models import flops_per_token
    from muonjax.train import TrainConfig, TrainingStopped, run
    from muonjax.train.tokenizer import ByteTokenizer

    config = TrainConfig(out=str(out), progress=False, mesh=None, **fields)
    started = time.perf_counter()
    per_token = flops_per_token(
        config.model_config(vocab_size=ByteTokenizer.vocab_size), config.seq_len
    )
    tokens = config.steps * config.batch_size * config.seq_len
    result = {"flops": float(per_token) * tokens, "tokens": tokens,
              "config": {**config.to_json(), "out": None}}  # fmt: skip
    try:
        summary = run(config, log=lambda *_: None)
    except TrainingStopped:  # diverged: no loss, no frontier point
        return {**result, "eval_loss": None, "train_loss": None, "diverged": True,
                "wall_time_s": time.perf_counter() - started}  # fmt: skip
    assert summary.flops == result["flops"], (summary.flops, result["flops"])
    return {
        **result,
        "eval_loss": float(summary.eval_loss),
        "train_loss": float(summary.loss),
        "diverged": False,
        "tokens_per_s": summary.tokens_per_s,
        "wall_time_s": time.perf_counter() - started,
    }


def previous_runs(out: pathlib.Path, quick: bool) -> list[dict]:
    """The runs of an earlier results.json in OUT (same mode), to reuse those
    whose config is identical: a sweep can be extended or resumed."""
    path = out / "results.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    return old.get("runs", []) if old.get("quick") == quick else []


def _as_now(saved: dict) -> dict:
    """A saved run's config as today's TrainConfig writes it (newer fields at their defaults)."""
    from muonjax.train import TrainConfig

    return json.loads(
        json.dumps({**TrainConfig.from_json({**saved, "out": "-"}).to_json(), "out": None})
    )


def run_cpu(args) -> dict:
    import jax

    from muonjax.train import TrainConfig

    sizes, base, rates = cpu_setup(args.quick)
    started = time.perf_counter()
    runs, setup, reused = [], {}, 0
    earlier = previous_runs(pathlib.Path(args.out), args.quick)
    with tempfile.TemporaryDirectory(prefix="compute_efficiency-") as tmp:

        def train(size, optimizer, lr, seed):
            nonlocal reused
            fields = dict(setup[size]["config"], optimizer=optimizer, learning_rate=lr, seed=seed)
            out = pathlib.Path(tmp) / f"{size}-{optimizer}-{lr:g}-{seed}"
            config = _as_now(
                TrainConfig(out=str(out), progress=False, mesh=None, **fields).to_json()
            )
            same = [r for r in earlier if _as_now(r["config"]) == config]
            r = same[0] if same else train_one(fields, out)
            reused += bool(same)
            r.update(size=size, optimizer=optimizer, learning_rate=lr, seed=seed)
            runs.append(r)
            loss = "diverged" if r["diverged"] else f"eval {r['eval_loss']:.4f}"
            print(f"{size} {optimizer:5} lr {lr:<6g} seed {seed}: {loss}, {r['flops']:.3g} FLOPs, "
                  f"{r['wall_time_s']:.0f} s{' (reused)' if same else ''}", flush=True)  # fmt: skip
            return r["eval_loss"]

        for size, model in sizes.items():
            n = non_embedding_params(base["preset"], model)
            setup[size] = {"non_embedding_params": n,
                           "config": size_config(model, base, n, args.quick)}  # fmt: skip
            for optimizer in OPTIMIZERS:
                losses = {lr: train(size, optimizer, lr, SEEDS[0]) for lr in rates}
                while not args.quick and (lr := common.next_rate(losses)) is not None:
                    losses[lr] = train(size, optimizer, lr, SEEDS[0])
        # a second seed at each frontier point (each distinct setting once)
        front = frontiers(runs, sizes)
        again = {
            (s, p[s]["optimizer"], p[s]["learning_rate"]) for p in front.values() for s in sizes
        }
        for size, optimizer, lr in sorted(again):
            for seed in SEEDS[1:]:
                train(size, optimizer, lr, seed)
    return {
        "scale": "cpu",
        "quick": args.quick,
        "sizes": setup,
        "learning_rates": list(rates),
        "rate_ladder": list(common.RATE_LADDER),
        "tokens_per_parameter": TOKENS_PER_PARAMETER,
        "runs": runs,
        "reused_runs": reused,
        "analysis": analyse(runs, list(sizes)),
        "wall_time_s": time.perf_counter() - started,
        "training_time_s": sum(r["wall_time_s"] for r in runs),
        "devices": jax.device_count(),
    }


# --- report -----------------------------------------------------------------------------

CURVES = {
    "adamw": "AdamW (best lr per size)",
    "muon_at_adamw_lr": "Muon at AdamW's lr (paper's protocol)",
    "muon": "Muon (own best lr per size)",
}
COLORS = {"adamw": "tab:green", "muon_at_adamw_lr": "tab:blue", "muon": "tab:purple"}


def markdown(results: dict) -> str:
    a, sizes = results["analysis"], list(results["sizes"])
    lines = ["| size | non-emb. params | FLOPs | " + " | ".join(CURVES.values()) + " |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for s in sizes:
        cells = [f"{a['frontiers'][c][s]['eval_loss']:.4f} (lr {a['frontiers'][c][s]['learning_rate']:g})"
                 for c in CURVES]  # fmt: skip
        lines.append(f"| {s} | {results['sizes'][s]['non_embedding_params']:,} "
                     f"| {a['frontiers']['adamw'][s]['flops']:.3g} | " + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "| curve | fit L = a C^b (C in FLOPs) | compute ratio vs AdamW (seed spread) |",
              "|---|---|---|"]  # fmt: skip
    for c, label in CURVES.items():
        f = a["fits"][c]
        ratio = ""
        if c in a["curves"]:
            r = a["curves"][c]
            lo, hi = r["compute_ratio_seed_range"]
            ratio = f"{r['compute_ratio']:.3f} (median {r['compute_ratio_seed_median']:.3f}, {lo:.3f}-{hi:.3f} over {r['seed_fits']} fits)"
        lines.append(f"| {label} | {f['a']:.4g} C^{f['b']:.4f} | {ratio} |")
    lines.append(f"| paper (Table 3, C in PFLOP/s-days) | Muon 2.506 C^-0.052, AdamW 2.608 C^-0.054 "
                 f"| {PAPER['compute_ratio']} |")  # fmt: skip
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    a, sizes, runs = results["analysis"], list(results["sizes"]), results["runs"]
    fig, (front_ax, sweep_ax) = plt.subplots(1, 2, figsize=(13, 5))
    marker = {"adamw": "s", "muon": "o"}
    color = {"adamw": COLORS["adamw"], "muon": COLORS["muon_at_adamw_lr"]}
    for r in (r for r in runs if r["eval_loss"] is not None):
        front_ax.scatter(r["flops"], r["eval_loss"], s=12, alpha=0.25,
                         marker=marker[r["optimizer"]], color=color[r["optimizer"]])  # fmt: skip
    flops = np.array([a["frontiers"]["adamw"][s]["flops"] for s in sizes])
    grid = np.geomspace(flops.min() / 1.3, flops.max() * 1.3, 50)
    for c, label in CURVES.items():
        f = a["fits"][c]
        front_ax.plot(flops, [a["frontiers"][c][s]["eval_loss"] for s in sizes], "o",
                      color=COLORS[c], label=f"{label}: {f['a']:.3g} C^{f['b']:.3f}")  # fmt: skip
        front_ax.plot(grid, f["a"] * grid ** f["b"], "-", color=COLORS[c], lw=1)
    ratio = a["curves"]["muon_at_adamw_lr"]["compute_ratio"]
    front_ax.set_title(f"frontiers and fits (Fig. 3); Muon needs {ratio:.2f}x AdamW's FLOPs")
    front_ax.set_xscale("log")
    front_ax.set_yscale("log")
    front_ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    front_ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    front_ax.set_xlabel("training FLOPs")
    front_ax.set_ylabel("eval loss")
    front_ax.legend(fontsize=7)
    for i, s in enumerate(sizes):
        for opt in OPTIMIZERS:
            rs = sorted((r for r in runs if r["size"] == s and r["optimizer"] == opt
                         and r["seed"] == SEEDS[0] and r["eval_loss"] is not None),
                        key=lambda r: r["learning_rate"])  # fmt: skip
            sweep_ax.plot([r["learning_rate"] for r in rs], [r["eval_loss"] for r in rs],
                          marker=marker[opt], color=color[opt], alpha=0.4 + 0.6 * i / len(sizes),
                          label=f"{opt} {s}")  # fmt: skip
    sweep_ax.set_xscale("log")
    sweep_ax.set_xlabel("peak learning rate")
    sweep_ax.set_ylabel("eval loss")
    sweep_ax.set_title("learning-rate sweeps (seed 0)")
    sweep_ax.legend(fontsize=6, ncol=2)
    for ax in (front_ax, sweep_ax):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- scale pod: build and inspect -------------------------------------------------------

POD_QUICK = {"q1": dict(heads=2, layers=1, hidden=64, tokens=None, lr=9e-4, batch=None)}


def table2_model(row: dict) -> dict:
    """--model for a Table 2 row: Llama-style dense, heads = layers, head dim
    128, SwiGLU 2.75 hidden (rounded to 128)."""
    return dict(d_model=row["hidden"], n_layers=row["layers"], first_k_dense=row["layers"],
                n_heads=row["heads"], attention="mha", head_dim=row["hidden"] // row["heads"],
                intermediate_size=round(2.75 * row["hidden"] / 128) * 128)  # fmt: skip


def pod_configs(quick: bool, data_parallel: int, mesh: str) -> dict:
    """Table 2's models: Llama-style dense, heads = layers, head dim 128,
    SwiGLU 2.75 hidden; 8K sequences, Table 2's batch, tokens and AdamW-tuned
    lr (Muon reuses it), cosine; one sequence per data-parallel rank per micro-batch."""
    from muonjax.train import TrainConfig

    rows = POD_QUICK if quick else PAPER["table2"]
    seq_len = 64 if quick else 8192
    configs = {}
    for size, row in rows.items():
        batch = row["batch"] or 2 * data_parallel
        if batch % data_parallel:
            raise SystemExit(f"--mesh: the data-parallel size {data_parallel} does not divide "
                             f"the paper's batch of {batch} sequences ({size})")  # fmt: skip
        model = table2_model(row)
        steps = 20 if quick else round(row["tokens"] / (batch * seq_len))
        for optimizer in OPTIMIZERS:
            configs[(size, optimizer)] = TrainConfig(
                out=f"runs/{NAME}/{size}-{optimizer}", preset="tiny" if quick else "moonlight-16b-a3b",
                model=model, seq_len=seq_len, batch_size=batch, grad_accum=batch // data_parallel,
                steps=steps, learning_rate=row["lr"], optimizer=optimizer, schedule="cosine",
                warmup_steps=2 if quick else 500, mesh=mesh,
            )  # fmt: skip
    return configs


def run_pod(args) -> dict:
    from muonjax.models import flops_per_token, param_counts
    from muonjax.parallel.mesh import make_mesh, parse_mesh
    from muonjax.train.costs import step_costs

    sizes = parse_mesh(args.mesh)
    mesh = make_mesh(sizes)
    started = time.perf_counter()
    report = {}
    for (size, optimizer), config in pod_configs(
        args.quick, sizes["data"] * sizes["expert"], args.mesh
    ).items():
        model = config.model_config()
        t = time.perf_counter()
        inspected = step_costs(config, mesh)
        counts = param_counts(model)
        tokens = config.steps * config.batch_size * config.seq_len
        per_token = flops_per_token(model, config.seq_len)
        report[f"{size}-{optimizer}"] = {
            "size": size,
            "optimizer": optimizer,
            "config": config.to_json(),
            "model": dict(model.__dict__),
            "parameters": counts,
            "flops_per_token": per_token,
            "tokens": tokens,
            "tokens_per_non_embedding_parameter": tokens / counts["total_non_embedding"],
            "run_flops": float(per_token) * tokens,
            "run_pflop_s_days": float(per_token) * tokens / PFLOP_S_DAY,
            "peak_bytes_per_device": inspected["peak_bytes"],
            "inspect_s": time.perf_counter() - t,
        }
        print(f"{size} {optimizer}: {counts['total_non_embedding'] / 1e6:.0f}M non-emb., "
              f"{inspected['peak_bytes'] / 2**30:.2f} GiB/device", flush=True)  # fmt: skip
    return {"mesh": args.mesh, "runs": report, "wall_time_s": time.perf_counter() - started}


def pod_markdown(pod: dict) -> str:
    lines = ["| size | optimizer | params (non-emb.) | FLOPs/token | steps x batch x seq | tokens "
             "(per param) | C (PFLOP/s-days) | paper's ratio at C | peak GiB/device |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in pod["runs"].values():
        c = r["config"]
        lines.append(
            f"| {r['size']} | {r['optimizer']} | {r['parameters']['total_non_embedding'] / 1e6:.0f}M "
            f"| {r['flops_per_token']:.3g} | {c['steps']} x {c['batch_size']} x {c['seq_len']} "
            f"(accum {c['grad_accum']}) | {r['tokens']:.3g} ({r['tokens_per_non_embedding_parameter']:.1f}) "
            f"| {r['run_pflop_s_days']:.3g} | {paper_compute_ratio(r['run_pflop_s_days']):.3f} "
            f"| {r['peak_bytes_per_device'] / 2**30:.2f} |"
        )
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = common.arguments(NAME, __doc__, argv)
    out = pathlib.Path(args.out)
    if args.scale == "pod":
        pod = run_pod(args)
        return common.report_pod(out, PAPER, args.quick, pod, pod_markdown(pod))
    results = {"paper": PAPER, **run_cpu(args)}
    print(markdown(results))
    print(f"\nwall time {results['wall_time_s']:.0f} s in all")
    path = common.write_results(out, results)
    flops = [r["flops"] for r in results["runs"]]
    plot(results, out / f"{NAME}.png",
         f"Compute efficiency, Fig. 3 ({'quick' if args.quick else 'cpu'}): dense, "
         f"{len(results['sizes'])} sizes, {min(flops):.2g}-{max(flops):.2g} FLOPs")  # fmt: skip
    print(f"wrote {path} and {out / f'{NAME}.png'}")
    return 0


if __name__ == "__main__":
    common.start_jax()
    sys.exit(main())
