"""SVD entropy: Figure 4 of "Muon is Scalable for LLM Training" (Sec. 3.4).

    python experiments/svd_entropy.py                 # --scale cpu: 4 runs, ~9 min on 2 cores
    python experiments/svd_entropy.py --quick         # toy sizes, end to end in seconds
    python experiments/svd_entropy.py --scale pod [--mesh expert=8]   # build + inspect, no training

The SVD entropy of a matrix with singular values s_1..s_n, n = min(rows, cols),

    H = -1/log(n) sum_i p_i log p_i,    p_i = s_i^2 / sum_j s_j^2

is 1 when every direction carries the same energy and 0 for rank one
(`muonjax.models.svd_entropy`). The paper compares Moonlight (Muon) with Moonlight-A
(AdamW, otherwise the same) over 1.2T tokens: the mean entropy of each group of
matrices (AttnQO, AttnKV, Experts, SharedExperts, Router, Dense; every layer's
and every expert's matrix its own) is higher under Muon at every checkpoint,
most of all for the router, and over 90% of the individual matrices have a
higher entropy under Muon at the last checkpoint.

The CPU runs: a Moonlight-shaped byte-level MoE (the tiny preset with 3
layers: 1 dense, then 2 MoE layers of 8 routed experts, top 2, and a shared
expert; MLA attention), trained with the Moonlight recipe (Muon) and with AdamW
(betas 0.9 / 0.95) on the same tokens, schedule (cosine) and weight decay (0.1),
at two learning rates, 3e-3 and 1e-2 (1e-2 was AdamW's best in
experiments/update_rms.py). The main comparison is at the rate with AdamW's
lower eval loss, the paper's protocol (Muon reuses AdamW's tuned rate); the
other rate shows how much the entropies depend on it. The trainer logs the
group means every 25 steps (--svd-entropy-every); every matrix's entropy comes
from the checkpoints (every 50 steps), from which the fraction of matrices
higher under Muon. Step 0 is the initialization all runs share.

Writes results/svd_entropy/results.json (curves, per-matrix entropies, configs,
wall times, the paper's claims) and svd_entropy.png, and prints the comparison.
--scale pod builds the Figure 4 runs (Moonlight-16B-A3B, 1.2T tokens) and
reports parameters, FLOPs, matrices per group and `inspect`'s per-device peak
memory on --mesh (the default data=8 replicates the 16B parameters on every
device; expert=8 splits the experts).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "svd_entropy"

OPTIMIZERS = {"adamw": "AdamW", "muon": "Muon"}
COLORS = {"adamw": "tab:red", "muon": "tab:blue"}
# Figure 4's order: muonjax.models.FIGURE4_GROUPS, not imported before common.start_jax
GROUPS = ("AttnQO", "AttnKV", "Experts", "SharedExperts", "Router", "Dense")

PAPER = {
    "setting": "Moonlight (Muon) and Moonlight-A (AdamW), MoE with 2.24B activated / 15.29B "
    "total non-embedding parameters, checkpoints over 1.2T tokens of pretraining (Figure 4)",
    "claims": {
        "every_group_every_checkpoint": "across all training checkpoints and all groups of "
        "weight matrices, the SVD entropy of Muon is higher than that of AdamW",
        "router": "the discrepancy is more significant in the router weights",
        "per_matrix": "for over 90% of the weight matrices, the SVD entropy when optimized by "
        "Muon is higher than that of AdamW (checkpoint at 1.2T tokens)",
    },
    "per_matrix_fraction": 0.9,
    # the y-axis ticks printed on each of Figure 4's panels (the figure's range, not data)
    "figure_y_ticks": {
        "AttnQO": [0.80, 0.85, 0.90],
        "AttnKV": [0.85, 0.90, 0.95],
        "Experts": [0.93, 0.94, 0.95],
        "SharedExperts": [0.90, 0.92, 0.94],
        "Router": [0.7, 0.8, 0.9],
        "Dense": [0.95, 0.96, 0.97, 0.98],
    },
    "experts_sampled": "3 of 64 experts per layer (for efficiency); ours: every expert",
    "dense_group": "'the weight matrices in the first dense layer'; ours: that layer's MLP "
    "(its attention counts in AttnQO / AttnKV)",
}


# --- scale cpu: train -------------------------------------------------------------------

# --quick: 1 dense and 1 MoE layer (4 experts), MLA, toy widths; --scale pod: the MoE layer alone
QUICK_MODEL = dict(
    d_model=32, n_layers=2, first_k_dense=1, intermediate_size=64, n_heads=2,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    n_routed_experts=4, moe_intermediate_size=16,
)  # fmt: skip
POD_QUICK_MODEL = dict(QUICK_MODEL, n_layers=1, first_k_dense=0)


def cpu_base(quick: bool) -> dict:
    """The shared TrainConfig fields of the CPU runs (all but the optimizer and
    the learning rate): a Moonlight-shaped MoE, byte-level on the Python
    standard library's source."""
    if quick:
        return dict(
            preset="tiny", model=QUICK_MODEL, steps=8, batch_size=8, seq_len=32,
            schedule="cosine", warmup_steps=2, weight_decay=0.1,
            eval_every=8, eval_batches=1, log_every=2, checkpoint_every=4, svd_entropy_every=2,
        )  # fmt: skip
    # The tiny preset (d_model 64, MLA, 8 experts of width 64, top 2, a shared
    # expert, dense width 256) with 3 layers: 71 matrices. 500 steps x 32 x 128
    # = 2M tokens per run, ~0.24 s a step on 2 cores: ~2.2 min per run.
    return dict(
        preset="tiny", model=dict(n_layers=3, first_k_dense=1), steps=500, batch_size=32,
        seq_len=128, schedule="cosine", warmup_steps=20, weight_decay=0.1,
        eval_every=50, eval_batches=4, log_every=10, checkpoint_every=50, svd_entropy_every=25,
    )  # fmt: skip


def learning_rates(quick: bool) -> tuple[float, ...]:
    return (1e-2,) if quick else (3e-3, 1e-2)


def run_name(optimizer: str, learning_rate: float) -> str:
    return f"{optimizer}_lr{learning_rate:g}"


def _per_matrix(entropies: dict) -> dict[str, list[float]]:
    """{"path/of/leaf": [entropy of each of its matrices, flattened]}"""
    return {k: np.asarray(v, np.float64).ravel().tolist() for k, v in entropies.items()}


@functools.cache
def _svd_entropies():
    """muonjax.models.svd_entropies, jitted once for every checkpoint of every run."""
    import jax

    from muonjax.models import svd_entropies

    return jax.jit(svd_entropies)


def train_one(config, log) -> dict:
    """Trains `config`; returns its group-mean curves (metrics.jsonl), eval
    curve and every matrix's entropy at every checkpoint."""
    from muonjax.train import read_metrics, run

    started = time.perf_counter()
    summary = run(config, log=log)
    wall = time.perf_counter() - started
    per_step = config.batch_size * config.seq_len
    metrics = read_metrics(config.out)
    spectra = [r for r in metrics if "svd_entropy_Router" in r]
    evals = [r for r in metrics if "eval_loss" in r]
    logs = [r for r in metrics if "loss" in r]
    checkpoints = common.checkpoint_steps(config.out)
    saved = json.loads((pathlib.Path(config.out) / "config.json").read_text())
    return {
        "svd_entropy": {
            "step": [r["step"] for r in spectra],
            "tokens": [r["step"] * per_step for r in spectra],
            **{g: [r[f"svd_entropy_{g}"] for r in spectra] for g in GROUPS},
        },
        "per_matrix": {
            "step": checkpoints,
            "entropy": [
                _per_matrix(_svd_entropies()(common.params_at(config.out, s))) for s in checkpoints
            ],
        },
        "eval": {
            "step": [r["step"] for r in evals],
            "tokens": [r["step"] * per_step for r in evals],
            "eval_loss": [float(r["eval_loss"]) for r in evals],
        },
        "final": {
            "eval_loss": float(summary.eval_loss),
            "train_loss": float(np.mean([r["loss"] for r in logs[-max(len(logs) // 10, 1) :]])),
            **{g: spectra[-1][f"svd_entropy_{g}"] for g in GROUPS},
        },
        "summary": {**summary.to_json(), "out": None, "metrics_path": None},
        "wall_time_s": wall,
        "_saved": saved,
    }


def run_cpu(args) -> dict:
    import jax

    from muonjax.train import TrainConfig

    base = cpu_base(args.quick)
    rates = learning_rates(args.quick)
    results = {
        "scale": "cpu", "quick": args.quick, "base": base, "learning_rates": list(rates),
        "runs": {}, "configs": {},
    }  # fmt: skip
    started = time.perf_counter()
    quiet = lambda *_: None
    with tempfile.TemporaryDirectory(prefix="svd_entropy-") as tmp:
        for lr in rates:
            for optimizer, label in OPTIMIZERS.items():
                name = run_name(optimizer, lr)
                config = TrainConfig(
                    out=str(pathlib.Path(tmp) / name),
                    **base,
                    optimizer=optimizer,
                    learning_rate=lr,
                    keep_checkpoints=base["steps"] // base["checkpoint_every"] + 1,
                    progress=False,
                    mesh=None,  # every device on data
                )
                print(f"{label} at lr {lr:g}: training {config.steps} steps ...", flush=True)
                r = train_one(config, quiet)
                saved = r.pop("_saved")
                results["runs"][name] = {
                    "label": f"{label}, lr {lr:g}", "optimizer": optimizer, "learning_rate": lr, **r,
                }  # fmt: skip
                results["configs"][name] = {**config.to_json(), "out": None}
                f = r["final"]
                print(
                    f"{label} at lr {lr:g}: eval loss {f['eval_loss']:.4f}, SVD entropy "
                    + ", ".join(f"{g} {f[g]:.3f}" for g in GROUPS)
                    + f"; {r['wall_time_s']:.0f} s ({r['summary']['tokens_per_s'] or 0:.0f} tokens/s)",
                    flush=True,
                )
    first_run = next(iter(results["runs"].values()))
    results["initial"] = {g: first_run["svd_entropy"][g][0] for g in GROUPS}  # step 0, shared
    adamw_loss = {lr: results["runs"][run_name("adamw", lr)]["final"]["eval_loss"] for lr in rates}
    main = min(rates, key=adamw_loss.get)
    results["main_learning_rate"] = main
    results["comparison"] = {f"{lr:g}": compare(results["runs"], lr) for lr in rates}
    tokens = base["steps"] * base["batch_size"] * base["seq_len"]
    results["setup"] = {
        "parameters": saved["parameters"],
        "vocab_size": saved["model"]["vocab_size"],
        "model": saved["model"],
        "tokens": tokens,
        "matrices": len(_flat(first_run["per_matrix"]["entropy"][-1])),
        "main_learning_rate_rule": "the rate with AdamW's lowest final eval loss (Muon reuses it)",
    }
    results["wall_time_s"] = time.perf_counter() - started
    results["devices"] = jax.device_count()
    return results


def _flat(per_matrix: dict) -> np.ndarray:
    """Every matrix's entropy, in path order."""
    return np.concatenate([np.asarray(per_matrix[k]) for k in sorted(per_matrix)])


def _flat_groups(per_matrix: dict) -> np.ndarray:
    """The Figure 4 group of each entry of `_flat(per_matrix)`."""
    from muonjax.models.spectra import figure4_group

    return np.asarray(
        [figure4_group(tuple(k.split("/"))) for k in sorted(per_matrix) for _ in per_matrix[k]]
    )


def compare(runs: dict, learning_rate: float) -> dict:
    """Muon against AdamW at one learning rate: the gap (Muon - AdamW) of each
    group's mean over the logged steps (statistics over the steps after 0,
    where both are the same initialization), and the fraction of individual
    matrices with a higher entropy under Muon at each checkpoint (matrices
    paired by path, layer and expert: both runs start from the same ones)."""
    muon, adamw = (runs[run_name(o, learning_rate)] for o in ("muon", "adamw"))
    steps = muon["svd_entropy"]["step"]
    assert adamw["svd_entropy"]["step"] == steps
    gaps = {
        g: (np.asarray(muon["svd_entropy"][g]) - np.asarray(adamw["svd_entropy"][g])).tolist()
        for g in GROUPS
    }
    trained = {g: np.asarray(gaps[g])[np.asarray(steps) > 0] for g in GROUPS}
    checkpoints = muon["per_matrix"]["step"]
    assert adamw["per_matrix"]["step"] == checkpoints
    higher = [
        float(np.mean(_flat(m) > _flat(a)))
        for m, a in zip(muon["per_matrix"]["entropy"], adamw["per_matrix"]["entropy"])
    ]
    last_m, last_a = muon["per_matrix"]["entropy"][-1], adamw["per_matrix"]["entropy"][-1]
    last_higher, groups = _flat(last_m) > _flat(last_a), _flat_groups(last_m)
    final_gap = {g: gaps[g][-1] for g in GROUPS}
    return {
        "learning_rate": learning_rate,
        "step": steps,
        "muon_minus_adamw": gaps,
        "muon_higher_fraction_of_steps": {g: float(np.mean(trained[g] > 0)) for g in GROUPS},
        "muon_higher_everywhere": bool(all(trained[g].min() > 0 for g in GROUPS)),
        "smallest_gap": {g: float(trained[g].min()) for g in GROUPS},
        "final_gap": final_gap,
        "largest_final_gap": max(GROUPS, key=final_gap.get),
        "mean_gap": {g: float(trained[g].mean()) for g in GROUPS},
        "largest_mean_gap": max(GROUPS, key=lambda g: trained[g].mean()),
        "per_matrix": {
            "step": checkpoints,
            "muon_higher_fraction": higher,
            "final_muon_higher_fraction": higher[-1],
            "final_by_group": {
                g: float(np.mean(last_higher[groups == g])) for g in GROUPS if g in groups
            },
            "matrices": int(_flat(last_m).size),
        },
        "final_eval_loss": {
            "muon": muon["final"]["eval_loss"],
            "adamw": adamw["final"]["eval_loss"],
        },
    }


def claims(results: dict) -> list[tuple[str, str, str]]:
    """(claim, paper, ours) rows, at the main learning rate (and the other)."""
    paper = PAPER["claims"]
    rows = []
    for key, c in results["comparison"].items():
        where = f"lr {key}" + (
            " (main)" if c["learning_rate"] == results["main_learning_rate"] else ""
        )
        worst = min(GROUPS, key=c["smallest_gap"].get)
        rows.append((
            f"{where}: Muon higher in every group at every step",
            "yes",
            ("yes" if c["muon_higher_everywhere"] else "no") + f" (smallest gap "
            f"{c['smallest_gap'][worst]:+.3f}, {worst}); final gaps "
            + ", ".join(f"{g} {c['final_gap'][g]:+.3f}" for g in GROUPS),
        ))  # fmt: skip
        rows.append((
            f"{where}: largest gap in the Router",
            "Router (" + paper["router"] + ")",
            f"largest final gap: {c['largest_final_gap']} "
            f"({c['final_gap'][c['largest_final_gap']]:+.3f}; Router {c['final_gap']['Router']:+.3f}); "
            f"largest mean gap over the run: {c['largest_mean_gap']}",
        ))  # fmt: skip
        pm = c["per_matrix"]
        rows.append((
            f"{where}: matrices individually higher under Muon",
            f"> {PAPER['per_matrix_fraction']:.0%}",
            f"{pm['final_muon_higher_fraction']:.1%} of {pm['matrices']} at the last checkpoint "
            f"(lowest over checkpoints {min(pm['muon_higher_fraction']):.1%}); by group "
            + ", ".join(f"{g} {f:.0%}" for g, f in pm["final_by_group"].items()),
        ))  # fmt: skip
    return rows


def markdown(results: dict) -> str:
    lines = [
        "| run | final eval loss | " + " | ".join(GROUPS) + " | tokens/s |",
        "|---|---|" + "---|" * len(GROUPS) + "---|",
        "| initialization | - | "
        + " | ".join(f"{results['initial'][g]:.3f}" for g in GROUPS)
        + " | - |",
    ]
    for r in results["runs"].values():
        f = r["final"]
        lines.append(
            f"| {r['label']} | {f['eval_loss']:.4f} | "
            + " | ".join(f"{f[g]:.3f}" for g in GROUPS)
            + f" | {r['summary']['tokens_per_s'] or 0:.0f} |"
        )
    lines += [
        "",
        "| claim | paper (Moonlight vs Moonlight-A, 1.2T tokens) | ours |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in claims(results)]
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, main = results["runs"], results["main_learning_rate"]
    fig, axes = plt.subplots(2, 4, figsize=(17, 8))
    panels = dict(zip(GROUPS, axes.flat))
    for r in runs.values():
        main_rate = r["learning_rate"] == main
        style = dict(
            color=COLORS[r["optimizer"]],
            ls="-" if main_rate else "--",
            alpha=1 if main_rate else 0.5,
        )
        s = r["svd_entropy"]
        for g, ax in panels.items():
            ax.plot(s["step"], s[g], label=r["label"], **style)
    for g, ax in panels.items():
        ax.set_title(g)
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("mean SVD entropy")
    axes[1, 0].set_ylabel("mean SVD entropy")
    axes[0, 0].legend(fontsize=8)

    scatter, fraction = axes[1, 2], axes[1, 3]
    last_m = runs[run_name("muon", main)]["per_matrix"]["entropy"][-1]
    a, m = _flat(runs[run_name("adamw", main)]["per_matrix"]["entropy"][-1]), _flat(last_m)
    groups = _flat_groups(last_m)
    for g, color in zip(GROUPS, plt.get_cmap("tab10").colors):
        pick = groups == g
        scatter.scatter(a[pick], m[pick], s=12, color=color, label=g)
    low = min(a.min(), m.min())
    scatter.plot([low, 1], [low, 1], color="grey", lw=0.8)
    scatter.set_xlabel("AdamW")
    scatter.set_ylabel("Muon (above the diagonal: higher)")
    scatter.set_title(f"each matrix, last checkpoint, lr {main:g}")
    scatter.legend(fontsize=7)
    for key, c in results["comparison"].items():
        pm = c["per_matrix"]
        fraction.plot(pm["step"], pm["muon_higher_fraction"], "o-", label=f"lr {key}",
                      alpha=1 if c["learning_rate"] == main else 0.5)  # fmt: skip
    fraction.axhline(PAPER["per_matrix_fraction"], color="grey", ls=":", label="paper: > 90%")
    fraction.set_ylim(0, 1.05)
    fraction.set_xlabel("training steps")
    fraction.set_title("fraction of matrices higher under Muon")
    fraction.legend(fontsize=8)
    fraction.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- scale pod: build and inspect -------------------------------------------------------

_PAPER_BATCH, _PAPER_SEQ = 4096, 8192  # sequences of 8K: 2048 until 200B tokens, then 4096


def pod_setup(quick: bool, data_parallel: int) -> dict:
    """Moonlight's pretraining (Sec. 3.3) up to Figure 4's 1.2T tokens: lr 4.2e-4
    after 2k warmup steps, cosine toward 4.2e-5 at 5.2T tokens (so barely decayed
    at 1.2T, as the paper's checkpoint), weight decay 0.1; one batch of 4096 x 8K
    (the paper's 2048 for the first 200B tokens is not modelled); one sequence
    per data-parallel rank per micro-batch; the SVD entropy every 1000 steps."""
    if quick:
        preset, model, seq_len, batch = "tiny", POD_QUICK_MODEL, 64, 2 * data_parallel
        steps, horizon, warmup, every = 20, 80, 2, 5
    else:
        preset, model, seq_len, batch = "moonlight-16b-a3b", {}, _PAPER_SEQ, _PAPER_BATCH
        per_step = batch * seq_len
        steps, horizon, warmup, every = (
            round(1.2e12 / per_step),
            round(5.2e12 / per_step),
            2000,
            1000,
        )
    if batch % data_parallel:
        raise SystemExit(
            f"--mesh: the data-parallel size {data_parallel} (data x expert) does not divide "
            f"the paper's batch of {batch} sequences"
        )
    return dict(
        preset=preset, model=model, seq_len=seq_len, batch_size=batch,
        grad_accum=batch // data_parallel, learning_rate=4.2e-4, schedule="cosine",
        steps=steps, decay_steps=horizon, warmup_steps=warmup, min_lr_ratio=0.1,
        weight_decay=0.1, svd_entropy_every=every,
    )  # fmt: skip


def entropy_metric(model_config, steps: int, every: int, step_flops: float) -> dict:
    """What the trainer's --svd-entropy-every costs: the matrices it decomposes
    per group (every layer and expert) and the FLOPs of their singular values,
    4 m n^2 - 4/3 n^3 each (Golub-Van Loan, no vectors; m >= n), against the
    training FLOPs between two measurements."""
    from flax import nnx

    from muonjax.models import abstract_model
    from muonjax.models.spectra import figure4_group, hidden_matrices
    from muonjax.optim.paths import path_names

    params = nnx.state(abstract_model(model_config), nnx.Param)
    counts: dict[str, int] = {}
    flops = 0.0
    for path, _, leaf in hidden_matrices(params):
        group = figure4_group(path_names(path))
        matrices = math.prod(leaf.shape[:-2])
        counts[group] = counts.get(group, 0) + matrices
        n, m = sorted(leaf.shape[-2:])
        flops += matrices * (4 * m * n**2 - 4 / 3 * n**3)
    return {
        "matrices": {g: counts[g] for g in GROUPS if g in counts},
        "flops": flops,
        "measurements": steps // every + 1 + (steps % every > 0),  # step 0, every, the last
        "fraction_of_training_flops": flops / (every * step_flops),
    }


def run_pod(args) -> dict:
    from muonjax.models import flops_per_token, param_counts
    from muonjax.parallel.mesh import make_mesh, parse_mesh
    from muonjax.train import TrainConfig
    from muonjax.train.costs import step_costs

    sizes = parse_mesh(args.mesh)
    mesh = make_mesh(sizes)
    setup = pod_setup(args.quick, sizes["data"] * sizes["expert"])
    started = time.perf_counter()
    report = {}
    for optimizer, label in OPTIMIZERS.items():
        config = TrainConfig(
            out=f"runs/{NAME}/{optimizer}", **setup, optimizer=optimizer, mesh=args.mesh
        )
        model = config.model_config()
        t = time.perf_counter()
        inspected = step_costs(config, mesh)
        print(f"{label}: inspected in {time.perf_counter() - t:.0f} s", flush=True)
        per_token = flops_per_token(model, config.seq_len)
        tokens = config.steps * config.batch_size * config.seq_len
        report[optimizer] = {
            "label": f"{'Moonlight' if optimizer == 'muon' else 'Moonlight-A'} ({label})",
            "config": config.to_json(),
            "model": dict(model.__dict__),
            "parameters": param_counts(model),
            "flops_per_token": per_token,
            "tokens": tokens,
            "run_flops": float(per_token) * tokens,
            "inspect": {**inspected, "inspect_s": time.perf_counter() - t},
            "peak_bytes_per_device": inspected["peak_bytes"],
        }
    step_flops = per_token * config.batch_size * config.seq_len
    entropy = entropy_metric(model, config.steps, config.svd_entropy_every, step_flops)
    return {
        "mesh": args.mesh,
        "setup": setup,
        "runs": report,
        "svd_entropy_metric": entropy,
        "wall_time_s": time.perf_counter() - started,
    }


def pod_markdown(pod: dict) -> str:
    lines = [
        "| run | params (total / active, non-emb.) | FLOPs/token | steps x batch x seq | tokens "
        "| run FLOPs | peak GiB/device |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in pod["runs"].values():
        p, c = r["parameters"], r["config"]
        lines.append(
            f"| {r['label']} | {p['total_non_embedding'] / 1e6:.0f}M / "
            f"{p['active_non_embedding'] / 1e6:.0f}M | {r['flops_per_token']:.3g} "
            f"| {c['steps']} x {c['batch_size']} x {c['seq_len']} (grad_accum {c['grad_accum']}) "
            f"| {r['tokens']:.3g} | {r['run_flops']:.3g} | {r['peak_bytes_per_device'] / 2**30:.2f} |"
        )
    e = pod["svd_entropy_metric"]
    lines += [
        "",
        f"--svd-entropy-every {pod['setup']['svd_entropy_every']}: "
        + ", ".join(f"{g} {n}" for g, n in e["matrices"].items())
        + f" matrices; {e['flops']:.3g} FLOPs a measurement "
        f"({e['fraction_of_training_flops']:.1e} of the training FLOPs in between)",
    ]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = common.arguments(NAME, __doc__, argv)
    out = pathlib.Path(args.out)
    if args.scale == "pod":
        pod = run_pod(args)
        return common.report_pod(out, PAPER, args.quick, pod, pod_markdown(pod))

    results = {"paper": PAPER, **run_cpu(args)}
    s = results["setup"]
    print(
        f"\n{s['parameters']['total_non_embedding']:,} non-embedding parameters, "
        f"{s['matrices']} matrices, {s['tokens'] / 1e6:.2f}M tokens per run; main learning rate "
        f"{results['main_learning_rate']:g} (AdamW's best)\n"
    )
    print(markdown(results))
    print(f"\nwall time {results['wall_time_s']:.0f} s in all")
    path = common.write_results(out, results)
    plot(results, out / f"{NAME}.png",
         f"SVD entropy, Figure 4 ({'quick' if args.quick else 'cpu'}): MoE, "
         f"{s['parameters']['total_non_embedding'] / 1e3:.0f}k non-emb. params, "
         f"{s['matrices']} matrices, {s['tokens'] / 1e6:.1f}M tokens per run")  # fmt: skip
    print(f"wrote {path} and {out / f'{NAME}.png'}")
    return 0


if __name__ == "__main__":
    common.start_jax()
    sys.exit(main())
