"""Update RMS: Table 1 and Table 8 of "Muon is Scalable for LLM Training" (Sec. 3.1, App.).

    python experiments/update_rms.py [--scale cpu|gpu|pod] [--quick] [--dry-run]

Dense models, MLP [H, 4H] (the paper's Table 1), full MHA, weight decay 0.1.
AdamW's rate (betas 0.9 / 0.95) first: a quarter-decade grid from three rates,
extended while the best is at an edge, on SEEDS, chosen on seed means of
final_eval_loss. Table 1 at that rate on TABLE1_SEEDS: AdamW and Muon's rules
Baseline (hidden, Eq. 5: 0.2 sqrt(H) O), Update Norm (update_norm, Eq. 6: 0.2 O
/ RMS(O)), Adjusted LR (moonlight, Eq. 7: 0.2 sqrt(max(A, B)) O), with weight
RMS per matrix group and the last step's update RMS from the last two
checkpoints, U = -(W_N - W_{N-1}) / lr - wd W_{N-1}. Verdicts on paired
differences over seeds: Baseline - Update Norm > 0, Baseline - Adjusted LR > 0
(paper: +0.023 each);
RMS matching (Sec. 2.2, AdamW's "0.2 to 0.4"): per seed m = max over groups of
|ln(U_AdjustedLR / U_AdamW)|, reproduced when the 95% interval of ln 2 - m is
above 0 (all within a factor 2, the width of the paper's range), not when below.
Table 8: Adjusted LR over learning rate (three quarter-decade rates around
AdamW's, extended to MAX_RATES while a scale's best is at an edge) x rms_scale
0.05-0.8, on SEEDS. rms_scale multiplies the hidden matrices' update as the rate
does, so at one rate (the paper's table; this script before) it is a Muon
learning-rate sweep in disguise: each scale is judged at its own best rate, and
the best products lr x rms_scale are compared (equal products: only the AdamW-
trained embeddings, head and norms tell scales apart). "0.2 is near-best": 0.2's
loss minus the best scale's (paired, each at its best rate) below NEAR_BEST x
0.2's loss with 95% confidence (paper: 0.4 beats it by 0.3%); not when above.

cpu: byte-level stdlib, d48 x 2, 301 steps of 16 x 128: 44-68 runs (as the
grids extend) of ~35 s (~55 s of CPU time), 30-40 min on 2 idle cores. gpu:
python corpus, BPE 8192, bfloat16, d256 x 6, 2001 steps of 64 x 512 (Table 8's
2k; 1.6 TFLOP a step, about a minute a run on an H100: estimated, not run).
pod: Table 2's 822M made dense, 160 x 8K (micro-batches of a sequence a device,
full remat), 4B tokens of a 20B-token schedule (Table 1's; Table 8's too),
AdamW at Table 2's 8.825e-4, Table 8 on one seed (its verdict inconclusive).
The ledger (OUT/ledger.json, OUT/runs/) makes every sweep resumable.
"""

from __future__ import annotations

import math
import pathlib
import sysconfig

import numpy as np
import sweep

NAME = "update_rms"
RULES = {"hidden": "Baseline", "update_norm": "Update Norm", "moonlight": "Adjusted LR"}
RMS_SCALES = (0.05, 0.1, 0.2, 0.4, 0.8)
SEEDS, TABLE1_SEEDS = (0, 1), (0, 1, 2)
MAX_RATES = 5  # per rms_scale in Table 8 (and AdamW's sweep)
NEAR_BEST = 0.005  # Table 8: "near-best" = within 0.5% of the best scale's loss
MATCH_FACTOR = 2.0  # RMS matching: every group's update RMS within 2x AdamW's
_KEYS = ("train_loss", "eval_loss", "AttnQ_weight_rms", "Dense_weight_rms")
PAPER = {
    "table1": {k: dict(zip(_KEYS, v)) for k, v in {  # 800M, 4B of 20B tokens, MLP [H, 4H]
        "Baseline": (2.734, 2.812, 3.586e-2, 2.52e-2),
        "Update Norm": (2.72, 2.789, 4.918e-2, 5.01e-2),
        "Adjusted LR": (2.721, 2.789, 3.496e-2, 4.89e-2)}.items()},
    "table8": {k: dict(zip(_KEYS, v)) for k, v in {  # "small-scale models", 2k steps, one rate
        "AdamW": (3.512, 3.679, 1.01e-2, 1.25e-2), "0.05": (3.355, 3.503, 5.74e-3, 8.01e-3),
        "0.1": (3.239, 3.374, 8.44e-3, 1.27e-2), "0.2": (3.198, 3.325, 1.57e-2, 2.35e-2),
        "0.4": (3.199, 3.314, 2.95e-2, 4.51e-2), "0.8": (3.386, 3.543, 7.23e-2, 8.73e-2)}.items()},
    "adamw_update_rms": (0.2, 0.4),  # Sec. 2.2: "typically ... 0.2 to 0.4"
    "claims": ["Table 1: Update Norm and Adjusted LR beat Baseline (eval loss 2.789 vs 2.812)",
               "Sec. 2.2: Adjusted LR's rms_scale 0.2 matches AdamW's update RMS (0.2-0.4)",
               "Table 8: rms_scale 0.2 is near-best (0.4: -0.011; 0.05, 0.1, 0.8: +0.05-0.23)"],
}  # fmt: skip


def scale_setup(scale: str, quick: bool, devices: int) -> dict:
    """Shared TrainConfig fields (steps = 4k + 1: checkpoints every k keep N-1 and
    N), AdamW's first rates, rms_scales, Table 8's rate offsets, seeds, extend."""
    if quick:
        data = (str(pathlib.Path(sysconfig.get_paths()["stdlib"]) / "json"),)
        base = dict(model=sweep.dense_model(32, 1, 2, mlp=4), batch_size=max(8, devices), seq_len=32, steps=5,
                    warmup_steps=1, eval_batches=1, final_eval_tokens=2048, data=data,
                    validation_fraction=0.1)  # fmt: skip
        if scale == "gpu":  # its data path: a BPE over the sweep's shards
            base.update(tokenizer="bpe", bpe_vocab_size=320, dtype="bfloat16")
        if scale != "cpu":  # gpu, pod: their data path and mesh, not statistics: 4 runs
            return dict(base=base, adamw=(0.01,), scales=(0.2,), offsets=(0,), seeds=(0,),
                        table1_seeds=(0,), extend=False)  # fmt: skip
        return dict(base=base, adamw=(0.01,), scales=(0.2, 0.8), offsets=(0, 1), seeds=SEEDS,
                    table1_seeds=SEEDS, extend=False)  # fmt: skip
    setup = dict(scales=RMS_SCALES, offsets=(-1, 0, 1), seeds=SEEDS, table1_seeds=TABLE1_SEEDS,
                 extend=True)  # fmt: skip
    if scale == "cpu":
        base = dict(model=sweep.dense_model(48, 2, 3, mlp=4), batch_size=16, seq_len=128, steps=301,
                    warmup_steps=20, eval_batches=8)  # fmt: skip
        return dict(setup, base=base, adamw=(0.01, 0.0178, 0.0316))
    bpe = dict(corpus="python", tokenizer="bpe", dtype="bfloat16")
    if scale == "gpu":
        base = dict(model=sweep.dense_model(256, 6, 4, mlp=4), batch_size=64, seq_len=512, steps=2001,
                    warmup_steps=200, eval_batches=8, bpe_vocab_size=8192, **bpe)  # fmt: skip
        return dict(setup, base=base, adamw=(3.16e-3, 5.62e-3, 0.01))
    base = dict(model=sweep.dense_model(2048, 16, 16, mlp=4), batch_size=160, seq_len=8192, steps=3053,
                decay_steps=15259, warmup_steps=500, bpe_vocab_size=32768, remat="full",
                grad_accum=160 // math.gcd(160, devices), **bpe)  # fmt: skip
    return dict(setup, base=base, adamw=(8.825e-4,), seeds=(0,), extend=False)


def fields_of(setup: dict, mesh) -> dict:
    n = setup["base"]["steps"]
    return dict(setup["base"], preset="tiny", weight_decay=0.1, eval_every=n, mesh=mesh,
                checkpoint_every=(n - 1) // (4 if n > 9 else 1), keep_checkpoints=2,
                log_every=max(n // 20, 1))  # fmt: skip


def rate_grid(best: float) -> tuple[float, ...]:
    """The quarter-decade ladder through `best`: RATES, or one of its own."""
    own = tuple(float(f"{best * 10 ** (k / 4):.4g}") for k in range(-8, 9))
    return sweep.RATES if best in sweep.RATES else own


def rms(arrays) -> float:
    return float(np.sqrt(np.mean(np.concatenate([np.ravel(a) for a in arrays]) ** 2)))


def measure(fields: dict):
    """The ledger's `measure`: per group, the weight RMS at the end and the RMS of
    the last update U (Muon's scaled O, AdamW's m / sqrt(v): W -= lr (U + wd W))."""

    def read(run_dir, summary) -> dict:
        from muonjax.train import TrainConfig
        from muonjax.train.optimizers import learning_rate_schedule

        config, n = TrainConfig(**fields), summary.steps
        lr = float(learning_rate_schedule(config)(n - 1))  # the last update's count is N-1
        old, new = (sweep.leaves_by_group(sweep.params_at(run_dir, k)) for k in (n - 1, n))
        f64, wd = lambda x: np.asarray(x, np.float64), config.weight_decay
        update = {g: rms([(f64(a) - f64(b)) / lr - wd * f64(a) for a, b in zip(old[g], new[g])])
                  for g in old}  # fmt: skip
        return {"weight_rms": {g: rms(leaves) for g, leaves in new.items()},
                "update_rms": None if summary.skipped_steps else update}  # fmt: skip

    return read


def train(args, ledger: sweep.Ledger, setup: dict) -> dict:
    """Every run of the protocol (module docstring), and the tables."""
    runs, base = {}, fields_of(setup, args.mesh)

    def train(seeds, lr, optimizer="muon", rule=None, rms_scale=None):
        for seed in seeds:
            fields = dict(base, optimizer=optimizer, learning_rate=lr, seed=seed)
            if optimizer == "muon":
                fields.update(update_scale=rule, rms_scale=rms_scale)
            if fields.get("tokenizer") == "bpe":
                fields = ledger.tokenized(fields)
            what = "adamw" if rule is None else f"muon {rule} rms {rms_scale:g}"
            r = ledger.train(fields, f"{what} lr {lr:g} seed {seed}", measure(fields))
            tags = dict(optimizer=optimizer, rule=rule, rms_scale=rms_scale, seed=seed)
            runs[r["key"]] = dict(r, learning_rate=lr, **tags)

    def tune(rates, grid, **tags):
        for lr in rates:
            train(setup["seeds"], lr, **tags)
        while setup["extend"] and len(rates) < MAX_RATES:
            lr = sweep.next_rate(sweep.rate_means(runs.values(), setup["seeds"], **tags), grid)
            if lr is None:
                break
            rates = (*rates, lr)
            train(setup["seeds"], lr, **tags)

    tune(setup["adamw"], sweep.RATES, optimizer="adamw")
    lr = sweep.best_rate(sweep.rate_means(runs.values(), setup["seeds"], optimizer="adamw"))
    train(setup["table1_seeds"], lr, optimizer="adamw")
    for rule in RULES:
        train(setup["table1_seeds"], lr, rule=rule, rms_scale=0.2)
    grid = rate_grid(lr)
    for scale in setup["scales"]:
        start = tuple(grid[grid.index(lr) + k] for k in setup["offsets"])
        tune(start, grid, optimizer="muon", rule="moonlight", rms_scale=scale)
    runs = list(runs.values())
    analysis = {"adamw_rate": lr, "table1": table1(runs, lr),
                "adamw_rates": sweep.rate_means(runs, setup["seeds"], optimizer="adamw"),
                "table8": table8(runs, setup["seeds"], lr)}  # fmt: skip
    return {"setup": setup, "runs": runs, "analysis": analysis}


def seeds_of(runs, **match) -> dict:
    """{seed: run} of the finished runs whose tags match."""
    return {r["seed"]: r for r in runs if r["final_eval_loss"] is not None
            and all(r.get(k) == v for k, v in match.items())}  # fmt: skip


def _losses(by_seed: dict) -> dict:
    return {s: r["final_eval_loss"] for s, r in by_seed.items()}


def _group_means(by_seed: dict, key: str) -> dict:
    values = [r[key] for r in by_seed.values() if r.get(key)]
    return {g: float(np.mean([v[g] for v in values])) for g in values[0]} if values else {}


def table1(runs: list, lr: float) -> dict:
    rows = {"AdamW": seeds_of(runs, optimizer="adamw", learning_rate=lr)}
    for rule, name in RULES.items():
        rows[name] = seeds_of(runs, rule=rule, rms_scale=0.2, learning_rate=lr)
    out = {"rows": {name: {"loss": sweep.estimate(_losses(s).values()).to_json(),
                           "by_seed": _losses(s), "weight_rms": _group_means(s, "weight_rms"),
                           "update_rms": _group_means(s, "update_rms")}
                    for name, s in rows.items()}, "differences": {}}  # fmt: skip
    for a, b, sign in (("Baseline", "Update Norm", 1), ("Baseline", "Adjusted LR", 1),
                       ("Update Norm", "Adjusted LR", 0)):  # fmt: skip
        d = sweep.paired(_losses(rows[a]), _losses(rows[b]))
        out["differences"][f"{a} - {b}"] = {"estimate": d.to_json(), "paper": round(
            PAPER["table1"][a]["eval_loss"] - PAPER["table1"][b]["eval_loss"], 4),
            "verdict": sweep.verdict(d, sign) if sign else None}  # fmt: skip
    adjusted, adamw = rows["Adjusted LR"], rows["AdamW"]
    out["rms_match"] = rms_match({s: r["update_rms"] for s, r in adjusted.items()},
                                 {s: r["update_rms"] for s, r in adamw.items()})  # fmt: skip
    return out


def rms_match(muon: dict, adamw: dict) -> dict:
    """{seed: {group: update RMS}} each: per seed, m = max over groups of
    |ln(muon / adamw)|; the verdict on ln MATCH_FACTOR - m (docstring)."""
    seeds = [s for s in sorted(set(muon) & set(adamw)) if muon[s] and adamw[s]]
    worst = [max(abs(math.log(muon[s][g] / adamw[s][g])) for g in muon[s]) for s in seeds]
    margin = sweep.estimate([math.log(MATCH_FACTOR) - m for m in worst] or [math.nan])
    return {"worst_log_ratio_by_seed": dict(zip(seeds, worst)), "margin": margin.to_json(),
            "verdict": sweep.verdict(margin, +1) if worst else "inconclusive"}  # fmt: skip


def table8(runs: list, seeds, adamw_lr: float) -> dict:
    rows = {}
    for scale in sorted({r["rms_scale"] for r in runs if r.get("rule") == "moonlight"}):
        means = sweep.rate_means(runs, seeds, rule="moonlight", rms_scale=scale)
        lr = sweep.best_rate(means)
        if lr is None:
            continue
        by_seed = seeds_of(runs, rule="moonlight", rms_scale=scale, learning_rate=lr)
        by_seed = {s: by_seed[s] for s in seeds}
        rows[scale] = {"learning_rate": lr, "product": lr * scale, "by_seed": _losses(by_seed),
                       "loss": sweep.estimate(_losses(by_seed).values()).to_json(),
                       "means_by_rate": means, "at_adamw_rate": means.get(adamw_lr),
                       "at_grid_edge": lr in (min(means), max(means)) and len(means) > 1,
                       "weight_rms": _group_means(by_seed, "weight_rms"),
                       "update_rms": _group_means(by_seed, "update_rms")}  # fmt: skip
    out = {"rows": rows}
    if 0.2 not in rows:
        return out
    best = min(rows, key=lambda s: rows[s]["loss"]["mean"])
    gap = sweep.paired(rows[0.2]["by_seed"], rows[best]["by_seed"])
    tolerance = NEAR_BEST * rows[0.2]["loss"]["mean"]
    excess = sweep.estimate(v - tolerance for v in gap.values)
    at_one = {s: r["at_adamw_rate"] for s, r in rows.items() if r["at_adamw_rate"] is not None}
    interior = [r["product"] for r in rows.values() if not r["at_grid_edge"]]
    spread = round(4 * math.log10(max(interior) / min(interior)), 2) if interior else None
    out.update(best_scale=best, tolerance=tolerance, gap_to_best=gap.to_json(),
               verdict=sweep.verdict(excess, -1),
               best_at_adamw_rate=min(at_one, key=at_one.get) if at_one else None,
               product_spread_quarter_decades=spread,  # of the interior best products
               vs_0_2={s: sweep.paired(r["by_seed"], rows[0.2]["by_seed"]).to_json()
                       for s, r in rows.items()})  # fmt: skip
    return out


def _e(e: dict) -> str:
    return f"{e['mean']:.4f}" + ("" if e["n"] < 2 else f" ± {e['half_width']:.4f}")


def markdown(results: dict) -> str:
    a = results["analysis"]
    t1, t8, lines = a["table1"], a["table8"], []
    lines += [f"Table 1 at AdamW's rate {a['adamw_rate']:g}", sweep.table_row(
        "rule", "final eval loss", "paper", "AttnQ / MLP weight RMS", "paper",
        "AttnQ / MLP update RMS"), sweep.table_row(*["---"] * 6)]  # fmt: skip
    for name, r in t1["rows"].items():
        p, w, u = PAPER["table1"].get(name, {}), r["weight_rms"], r["update_rms"]
        lines.append(sweep.table_row(name, _e(r["loss"]), p.get("eval_loss", "-"),
            f"{w.get('AttnQ', 0):.4g} / {w.get('Dense', 0):.4g}",
            f"{p['AttnQ_weight_rms']} / {p['Dense_weight_rms']}" if p else "-",
            f"{u.get('AttnQ', 0):.3f} / {u.get('Dense', 0):.3f}"))  # fmt: skip
    for name, d in t1["differences"].items():
        claim = d["verdict"] or "no claim"
        lines.append(f"- {name}: {_e(d['estimate'])} (paper {d['paper']:+.3f}): {claim}")
    m = t1["rms_match"]
    lines += [f"- RMS matching (ln 2 - max group |ln(U_AdjLR / U_AdamW)|): {_e(m['margin'])}: "
              f"{m['verdict']}", "", "Table 8 (Adjusted LR), each rms_scale at its own best rate",
              sweep.table_row("rms_scale", "best lr", "lr x rms_scale", "final eval loss",
                              "at AdamW's rate", "paper (one rate)", "minus 0.2's (paired)"),
              sweep.table_row(*["---"] * 7)]  # fmt: skip
    for s, r in t8["rows"].items():
        at = r["at_adamw_rate"]
        edge = " (edge)" if r["at_grid_edge"] else ""
        lines.append(sweep.table_row(s, f"{r['learning_rate']:g}{edge}",
            f"{r['product']:.3g}", _e(r["loss"]), "-" if at is None else f"{at:.4f}",
            PAPER["table8"].get(f"{s:g}", {}).get("eval_loss", "-"),
            _e(t8["vs_0_2"][s]) if "vs_0_2" in t8 else "-"))  # fmt: skip
    if "verdict" in t8:
        lines.append(f"- 0.2 near-best (gap to {t8['best_scale']:g} < {t8['tolerance']:.4f}): "
                     f"{_e(t8['gap_to_best'])}: {t8['verdict']}; best at AdamW's rate alone: "
                     f"{t8['best_at_adamw_rate']}; best products' spread "
                     f"{t8['product_spread_quarter_decades']} quarter-decades")  # fmt: skip
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
    a = results["analysis"]
    fig, (ax1, ax2) = sweep.figure(1, 2, (12, 4.5))
    diffs = {k: d["estimate"]["values"] for k, d in a["table1"]["differences"].items()}
    sweep.error_bars(
        ax1, list(diffs), [sweep.estimate(v) for v in diffs.values()], linestyle="none"
    )
    sweep.paper_line(ax1, 0.023, "paper: Baseline - either")
    ax1.axhline(0, color="k", lw=0.5)
    ax1.set(ylabel="paired final eval loss difference (mean ± 95%)",
            title=f"Table 1 at AdamW's rate {a['adamw_rate']:g}")  # fmt: skip
    for scale, r in a["table8"]["rows"].items():
        rates = [lr for lr, m in r["means_by_rate"].items() if m is not None]
        ax2.plot([lr * scale for lr in rates], [r["means_by_rate"][lr] for lr in rates], "o-",
                 label=f"rms_scale {scale:g}")  # fmt: skip
    ax2.set(xscale="log", xlabel="lr x rms_scale (the hidden matrices' step)",
            title="Table 8: Adjusted LR's lr x rms_scale grid (seed means)")  # fmt: skip
    sweep.save(fig, path, results, "Update RMS, Tables 1 and 8", f"{len(results['runs'])} runs")


def configs(args, setup: dict) -> dict:
    """--dry-run's configs: AdamW and Muon (the rules share shapes and cost)."""
    from muonjax.train import TrainConfig

    return {o: TrainConfig(**fields_of(setup, args.mesh), optimizer=o) for o in ("adamw", "muon")}


FINDING = sweep.Finding(NAME, __doc__, PAPER, scale_setup, configs, train, markdown, plot)
main = FINDING.main

if __name__ == "__main__":
    FINDING.command()
