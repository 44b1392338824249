"""Compute efficiency: Figure 1a, Figure 3 and Table 3 of "Muon is Scalable for
LLM Training" (Sec. 3.2, the scaling law of Muon).

    python experiments/compute_efficiency.py                # --scale cpu: 4 sizes, ~70 runs
    python experiments/compute_efficiency.py --scale gpu    # 1.6M-18M parameters, BPE, one GPU
    python experiments/compute_efficiency.py --scale pod    # Table 2's 399M-1.5B on a mesh
    python experiments/compute_efficiency.py --quick        # toy sizes, end to end in a minute
    ... --dry-run                                          # the configs and their memory only

Dense Llama-style models (full MHA, SwiGLU of width 2.75 d_model, as the
paper's Table 2 models), each trained at 20 tokens per non-embedding parameter
(Chinchilla; Table 2 uses 22-26) on the same data. At every size each
optimizer is swept on a quarter-decade grid of learning rates, from three
rates around its expected optimum and on past the edge while the best is at
one, with every grid point trained on SEEDS; the best rate is chosen on the
seed means of final_eval_loss (the trainer's end-of-run evaluation on 2^18
held-out tokens), so no seed both picks and measures. AdamW: betas 0.9 / 0.95,
weight decay 0.1; Muon: the Moonlight recipe (Adjusted LR, rms_scale 0.2,
weight decay 0.1), also at AdamW's best rate (the paper's protocol). FLOPs
are the trainer's: the model's 6N plus attention and Muon's Newton-Schulz.

The compute ratio (paper: 0.519) is the FLOPs Muon needs to reach the loss
AdamW reaches with C, over C, found two ways: on power-law fits L = a C^b of
the seed means (at the geometric middle of the sizes' compute; also with an
irreducible term L = E + a C^b), and by interpolating Muon's frontier
(log-log, no extrapolation) at each AdamW point. Its uncertainty is the range
over every choice of seed and of near-best rate (a rate whose seed mean is
within the best's seed spread) per frontier point. Verdict: reproduced when
that whole range is below 1 (Muon needs less compute), not reproduced when
above, else inconclusive; the paired loss gap AdamW - Muon at each size's
best rates is reported with its 95% interval over seeds.

The ledger (OUT/ledger.json, OUT/runs/) makes the sweep resumable: relaunched
after a stop, it trains only the runs that are missing and resumes a half-done
one from its checkpoint.
"""

from __future__ import annotations

import itertools
import math
import pathlib
import sysconfig

import numpy as np
import sweep

NAME = "compute_efficiency"
OPTIMIZERS = ("adamw", "muon")
SEEDS = (0, 1)
TOKENS_PER_PARAMETER = 20
PFLOP_S_DAY = 1e15 * 86400  # the unit of the paper's C

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


# --- the scales --------------------------------------------------------------------------


def table2_model(row: dict) -> dict:
    """--model for a Table 2 row: heads = layers, head dim 128, SwiGLU 2.75 hidden
    (rounded to 128)."""
    return dict(sweep.dense_model(row["hidden"], row["layers"], row["heads"]),
                intermediate_size=round(2.75 * row["hidden"] / 128) * 128)  # fmt: skip


def scale_setup(scale: str, quick: bool, devices: int) -> dict:
    """The scale's sizes ({name: --model}), shared TrainConfig fields, the rates
    each optimizer's sweep starts from (per size), whether sweeps extend, and seeds."""
    if quick:
        json_package = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "json"  # a small corpus
        sizes = {"d16": sweep.dense_model(16, 1, 2), "d24": sweep.dense_model(24, 1, 3)}
        base = dict(batch_size=max(8, devices), seq_len=32, warmup_steps=2, eval_batches=1,
                    final_eval_tokens=2048, data=(str(json_package),),
                    validation_fraction=0.1, steps=12)  # fmt: skip
        if scale == "gpu":  # its data path: a BPE over the sweep's shards
            base.update(tokenizer="bpe", bpe_vocab_size=320, dtype="bfloat16")
        start = {"adamw": (0.0316,), "muon": (0.0316,)}
        return dict(sizes=sizes, base=base, start=start, extend=False, seeds=SEEDS)
    if scale == "cpu":
        sizes = {f"d{d}": sweep.dense_model(d, 2, d // 8) for d in (32, 40, 48, 64)}
        base = dict(batch_size=16, seq_len=128, warmup_steps=20, eval_batches=16)
        start = {"adamw": (0.0178, 0.0316, 0.0562), "muon": (0.0316, 0.0562, 0.1)}
        return dict(sizes=sizes, base=base, start=start, extend=True, seeds=SEEDS)
    if scale == "gpu":  # one GPU, minutes per run; BPE over the python corpus
        sizes = {
            f"d{d}": sweep.dense_model(d, n, d // 32)
            for d, n in ((160, 5), (224, 7), (288, 8), (384, 10))
        }
        base = dict(batch_size=64, seq_len=512, warmup_steps=200, eval_batches=8,
                    corpus="python", tokenizer="bpe", bpe_vocab_size=8192, dtype="bfloat16")  # fmt: skip
        start = {"adamw": (3.16e-3, 5.62e-3, 0.01), "muon": (5.62e-3, 0.01, 0.0178)}
        return dict(sizes=sizes, base=base, start=start, extend=True, seeds=SEEDS)
    # pod: the paper's Table 2 at its batch, tokens and AdamW-tuned rate (Muon reuses it)
    sizes = {size: table2_model(row) for size, row in PAPER["table2"].items()}
    base = dict(seq_len=8192, schedule="cosine", warmup_steps=500, corpus="python",
                tokenizer="bpe", bpe_vocab_size=32768, dtype="bfloat16")  # fmt: skip
    start = {opt: {s: (r["lr"],) for s, r in PAPER["table2"].items()} for opt in OPTIMIZERS}
    return dict(sizes=sizes, base=base, start=start, extend=False, seeds=SEEDS[:1])


def size_fields(setup: dict, size: str, scale: str, quick: bool) -> dict:
    """A size's TrainConfig fields: steps for TOKENS_PER_PARAMETER tokens per
    non-embedding parameter (pod: Table 2's tokens and batch)."""
    fields = dict(setup["base"], preset="tiny", model=setup["sizes"][size])
    if scale == "pod" and not quick:
        row = PAPER["table2"][size]
        fields.update(batch_size=row["batch"], steps=round(row["tokens"] / (row["batch"] * 8192)))
    elif not quick:
        per_step = fields["batch_size"] * fields["seq_len"]
        fields["steps"] = round(TOKENS_PER_PARAMETER * non_embedding(fields) / per_step)
    return dict(fields, eval_every=fields["steps"], checkpoint_every=max(fields["steps"] // 5, 1),
                log_every=max(fields["steps"] // 20, 1))  # fmt: skip


def non_embedding(fields: dict) -> int:
    from muonjax.models import param_counts
    from muonjax.train import TrainConfig

    config = TrainConfig(preset=fields["preset"], model=fields["model"])
    return param_counts(config.model_config())["total_non_embedding"]


def _start_rates(setup: dict, optimizer: str, size: str) -> tuple[float, ...]:
    start = setup["start"][optimizer]
    return start[size] if isinstance(start, dict) else start


# --- the protocol ------------------------------------------------------------------------


def train(args, ledger: sweep.Ledger, setup: dict) -> dict:
    """Every run of the protocol (module docstring), trained or taken from the
    ledger; the sizes and the analysis."""
    runs = []

    def loss(size, optimizer, lr):
        new, mean = sweep.train_seeds(
            ledger, lambda seed: dict(size_fields(setup, size, args.scale, args.quick),
                                      optimizer=optimizer, learning_rate=lr, seed=seed,
                                      mesh=args.mesh),
            setup["seeds"], f"{size} {optimizer} lr {lr:g}", size=size, optimizer=optimizer,
            learning_rate=lr)  # fmt: skip
        runs.extend(new)
        return mean

    for size in setup["sizes"]:
        best = {o: sweep.best_rate(sweep.sweep_rates(lambda lr: loss(size, o, lr),  # noqa: B023
                                                     _start_rates(setup, o, size), setup["extend"]))
                for o in OPTIMIZERS}  # fmt: skip
        muon_rates = {r["learning_rate"] for r in runs if r["size"] == size and r["optimizer"] == "muon"}  # fmt: skip
        if best["adamw"] is not None and best["adamw"] not in muon_rates:
            loss(size, "muon", best["adamw"])  # the paper's protocol: Muon at AdamW's rate
    sizes = {s: {"non_embedding_params": non_embedding(size_fields(setup, s, args.scale, args.quick)),
                 "model": m} for s, m in setup["sizes"].items()}  # fmt: skip
    return {"sizes": sizes, "runs": runs, "analysis": analyse(runs, list(sizes))}


# --- the analysis ------------------------------------------------------------------------


def fit_power_law(flops, losses) -> dict:
    """L = a C^b by least squares on (log C, log L); a for C in FLOPs and in
    PFLOP/s-days (the paper's unit)."""
    b, log_a = np.polyfit(np.log(flops), np.log(losses), 1)
    return {"a": float(math.exp(log_a)), "b": float(b),
            "a_pflop_s_days": float(math.exp(log_a) * PFLOP_S_DAY**b)}  # fmt: skip


def fit_with_floor(flops, losses) -> dict:
    """L = E + a C^b: the E in [0, min L) whose power-law fit of L - E has the least
    squared error in L (a grid of 400 values)."""
    losses = np.asarray(losses, float)
    best = None
    for e in np.linspace(0, 0.995 * losses.min(), 400):
        fit = fit_power_law(flops, losses - e)
        error = float(np.sum((e + fit["a"] * np.asarray(flops) ** fit["b"] - losses) ** 2))
        if best is None or error < best["sse"]:
            best = {**fit, "e": float(e), "sse": error}
    return best


def compute_ratio(muon: dict, adamw: dict, flops: float) -> float:
    """FLOPs Muon's fit needs to reach AdamW's fitted loss at `flops`, over `flops`
    (fits with an optional floor `e`)."""
    target = adamw.get("e", 0.0) + adamw["a"] * flops ** adamw["b"]
    reach = target - muon.get("e", 0.0)
    if reach <= 0:
        return math.nan  # below Muon's floor: never reached
    return float((reach / muon["a"]) ** (1 / muon["b"]) / flops)


def paper_compute_ratio(pflop_s_days: float) -> float:
    """The same ratio from the paper's Table 3 fits, at C in PFLOP/s-days."""
    return compute_ratio(PAPER["fits"]["muon"], PAPER["fits"]["adamw"], pflop_s_days)


def interpolated_ratios(adamw: list, muon: list) -> list:
    """At each AdamW point (C, L), the FLOPs at which Muon's frontier (points (C, L),
    joined in log-log) reaches L, over C; None where L is outside Muon's losses."""
    c_m, l_m = np.log([c for c, _ in muon]), np.log([loss for _, loss in muon])
    order = np.argsort(l_m)
    ratios = []
    for c, loss in adamw:
        if not l_m.min() <= math.log(loss) <= l_m.max():
            ratios.append(None)
            continue
        reached = np.interp(math.log(loss), l_m[order], c_m[order])
        ratios.append(float(math.exp(reached) / c))
    return ratios


def settings(runs: list[dict], size: str, optimizer: str) -> dict:
    """{rate: {seed: run}} of the finished runs at a size."""
    out = {}
    for r in runs:
        if r["size"] == size and r["optimizer"] == optimizer and r["final_eval_loss"] is not None:
            out.setdefault(r["learning_rate"], {})[r["seed"]] = r
    return out


def frontier(runs: list[dict], sizes, optimizer: str, at_rates: dict | None = None) -> dict:
    """Per size: the rate with the best seed mean (or `at_rates[size]`), its
    estimate over seeds, FLOPs, and the near-best rates (seed mean within the
    best's seed spread, which is its own when it has one seed)."""
    out = {}
    for size in sizes:
        by_rate = {lr: s for lr, s in settings(runs, size, optimizer).items()
                   if len(s) == max(len(v) for v in settings(runs, size, optimizer).values())}  # fmt: skip
        means = {
            lr: np.mean([r["final_eval_loss"] for r in s.values()]) for lr, s in by_rate.items()
        }
        lr = at_rates[size] if at_rates else min(means, key=means.get)
        best = by_rate[lr]
        spread = np.ptp([r["final_eval_loss"] for r in best.values()])
        out[size] = {
            "learning_rate": lr,
            "loss": sweep.estimate(r["final_eval_loss"] for r in best.values()).to_json(),
            "by_seed": {str(s): r["final_eval_loss"] for s, r in best.items()},
            "flops": float(np.mean([r["flops"] for r in best.values()])),
            "near_best_rates": sorted(x for x, m in means.items() if m <= means[lr] + spread),
            "at_grid_edge": lr in (min(by_rate), max(by_rate)),
        }
    return out


def _choices(runs, sizes, optimizer, point: dict) -> list[list[tuple[float, float]]]:
    """Per size, every (FLOPs, loss) a frontier point could have been: any seed
    of any near-best rate."""
    per_size = []
    for size in sizes:
        by_rate = settings(runs, size, optimizer)
        per_size.append([(r["flops"], r["final_eval_loss"]) for lr in point[size]["near_best_rates"]
                         for r in by_rate[lr].values()])  # fmt: skip
    return per_size


def analyse(runs: list[dict], sizes: list[str]) -> dict:
    fronts = {"adamw": frontier(runs, sizes, "adamw"), "muon": frontier(runs, sizes, "muon")}
    adamw_rates = {s: p["learning_rate"] for s, p in fronts["adamw"].items()}
    if all(lr in settings(runs, s, "muon") for s, lr in adamw_rates.items()):
        fronts["muon_at_adamw_lr"] = frontier(runs, sizes, "muon", adamw_rates)
    points = {c: [(f[s]["flops"], f[s]["loss"]["mean"]) for s in sizes] for c, f in fronts.items()}
    fits = {c: fit_power_law(*zip(*p)) for c, p in points.items()}
    floors = {c: fit_with_floor(*zip(*p)) for c, p in points.items()}
    middle = float(math.exp(np.mean(np.log([c for c, _ in points["adamw"]]))))
    result = {"frontiers": fronts, "fits": fits, "fits_with_floor": floors,
              "ratio_at_flops": middle, "curves": {}}  # fmt: skip
    adamw_options = _choices(runs, sizes, "adamw", fronts["adamw"])
    for curve in ("muon", "muon_at_adamw_lr"):
        if curve not in fronts:
            continue
        options = adamw_options + _choices(runs, sizes, "muon", fronts[curve])
        ratios = [compute_ratio(fit_power_law(*zip(*pick[len(sizes):])),
                                fit_power_law(*zip(*pick[: len(sizes)])), middle)
                  for pick in _sample(options)]  # fmt: skip
        gaps = {s: sweep.paired({k: v for k, v in fronts["adamw"][s]["by_seed"].items()},
                                fronts[curve][s]["by_seed"]).to_json() for s in sizes}  # fmt: skip
        result["curves"][curve] = {
            "compute_ratio": compute_ratio(fits[curve], fits["adamw"], middle),
            "compute_ratio_with_floor": compute_ratio(floors[curve], floors["adamw"], middle),
            "compute_ratio_interpolated": interpolated_ratios(points["adamw"], points[curve]),
            "compute_ratio_range": [float(np.nanmin(ratios)), float(np.nanmax(ratios))],
            "choices": len(ratios),
            "loss_gap_adamw_minus_muon": gaps,  # > 0: Muon ahead at the same size
        }
        lo, hi = result["curves"][curve]["compute_ratio_range"]
        result["curves"][curve]["verdict"] = (
            "reproduced" if hi < 1 else "not reproduced" if lo > 1 else "inconclusive"
        )
    return result


def _sample(options: list[list], limit: int = 20000):
    """Every combination of one option per point, or `limit` of them drawn at random
    (seeded) when there are more."""
    total = math.prod(len(o) for o in options)
    if total <= limit:
        yield from itertools.product(*options)
        return
    rng = np.random.default_rng(0)
    for _ in range(limit):
        yield [o[rng.integers(len(o))] for o in options]


# --- report ------------------------------------------------------------------------------

CURVES = {"adamw": "AdamW", "muon": "Muon (own best rate)",
          "muon_at_adamw_lr": "Muon at AdamW's rate (paper's protocol)"}  # fmt: skip
COLORS = {"adamw": "tab:green", "muon": "tab:purple", "muon_at_adamw_lr": "tab:blue"}


def markdown(results: dict) -> str:
    a, sizes = results["analysis"], list(results["sizes"])
    curves = [c for c in CURVES if c in a["frontiers"]]
    lines = [sweep.table_row("size", "non-emb. params", *(CURVES[c] for c in curves)),
             sweep.table_row(*["---"] * (2 + len(curves)))]  # fmt: skip
    for s in sizes:
        cells = []
        for c in curves:
            p = a["frontiers"][c][s]
            e = sweep.Estimate(**{**p["loss"], "values": tuple(p["loss"]["values"])})
            edge = ", at grid edge" if p["at_grid_edge"] and c != "muon_at_adamw_lr" else ""
            cells.append(
                f"{e.mean:.4f} ± {0 if e.n < 2 else e.half_width:.4f} (lr {p['learning_rate']:g}{edge})"
            )
        lines.append(sweep.table_row(s, f"{results['sizes'][s]['non_embedding_params']:,}", *cells))
    lines += ["", sweep.table_row("curve", "fit L = a C^b", "ratio (fit)", "ratio (fit with floor)",
                                  "ratio (interpolated, per AdamW size)", "range over seeds and rates", "verdict"),
              sweep.table_row(*["---"] * 7)]  # fmt: skip
    for c, r in a["curves"].items():
        f = a["fits"][c]
        interp = ", ".join(
            "-" if x is None else f"{x:.2f}" for x in r["compute_ratio_interpolated"]
        )
        lo, hi = r["compute_ratio_range"]
        lines.append(sweep.table_row(CURVES[c], f"{f['a']:.4g} C^{f['b']:.4f}", f"{r['compute_ratio']:.3f}",
                                     f"{r['compute_ratio_with_floor']:.3f}", interp,
                                     f"{lo:.3f}-{hi:.3f} ({r['choices']} choices)", r["verdict"]))  # fmt: skip
    lines.append(sweep.table_row("paper (Table 3, C in PFLOP/s-days)", "Muon 2.506 C^-0.052, AdamW 2.608 C^-0.054",
                                 PAPER["compute_ratio"], "", "", "", ""))  # fmt: skip
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
    a, sizes, runs = results["analysis"], list(results["sizes"]), results["runs"]
    fig, (front_ax, rate_ax) = sweep.figure(1, 2, (13, 5))
    for c, f in a["frontiers"].items():
        flops = [f[s]["flops"] for s in sizes]
        estimates = [sweep.estimate(f[s]["loss"]["values"]) for s in sizes]
        fit = a["fits"][c]
        sweep.error_bars(front_ax, flops, estimates, color=COLORS[c], linestyle="none",
                         label=f"{CURVES[c]}: {fit['a']:.3g} C^{fit['b']:.3f}")  # fmt: skip
        grid = np.geomspace(min(flops) / 1.3, max(flops) * 1.3, 50)
        front_ax.plot(grid, fit["a"] * grid ** fit["b"], "-", color=COLORS[c], lw=1)
    ratio = a["curves"]["muon"]["compute_ratio"]
    front_ax.set(xscale="log", yscale="log", xlabel="training FLOPs (model + Newton-Schulz)",
                 ylabel="final eval loss (mean ± 95% over seeds)",
                 title=f"frontiers (Fig. 3): Muon needs {ratio:.2f}x AdamW's FLOPs "
                       f"(paper {PAPER['compute_ratio']})")  # fmt: skip
    front_ax.legend(fontsize=7)
    for i, s in enumerate(sizes):
        for opt, marker in (("adamw", "s"), ("muon", "o")):
            by_rate = sorted(settings(runs, s, opt).items())
            sweep.error_bars(rate_ax, [lr for lr, _ in by_rate],
                             [sweep.estimate(r["final_eval_loss"] for r in seeds.values())
                              for _, seeds in by_rate],
                             color=COLORS[opt], alpha=0.4 + 0.6 * i / len(sizes), marker=marker,
                             label=f"{opt} {s}")  # fmt: skip
    rate_ax.set(xscale="log", xlabel="peak learning rate", ylabel="final eval loss",
                title="learning-rate sweeps (quarter-decade grid, seed means)")  # fmt: skip
    rate_ax.legend(fontsize=6, ncol=2)
    flops = [r["flops"] for r in runs if r["final_eval_loss"] is not None]
    sweep.save(
        fig,
        path,
        results,
        "Compute efficiency, Fig. 3",
        f"dense, {len(sizes)} sizes, {min(flops):.2g}-{max(flops):.2g} FLOPs",
    )


# --- main --------------------------------------------------------------------------------


def configs(args, setup: dict) -> dict:
    """Each size's TrainConfig per optimizer at its first rate (for --dry-run)."""
    from muonjax.train import TrainConfig

    return {f"{size}-{opt}": TrainConfig(**size_fields(setup, size, args.scale, args.quick),
                                         optimizer=opt, mesh=args.mesh,
                                         learning_rate=_start_rates(setup, opt, size)[0])
            for size in setup["sizes"] for opt in OPTIMIZERS}  # fmt: skip


FINDING = sweep.Finding(NAME, __doc__, PAPER, scale_setup, configs, train, markdown, plot)
main = FINDING.main

if __name__ == "__main__":
    FINDING.command()
