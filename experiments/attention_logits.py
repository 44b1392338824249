"""Attention logits: Appendix D (Figure 7) of "Muon is Scalable for LLM Training".

    python experiments/attention_logits.py               # --scale cpu: ~22 runs, ~20 minutes
    python experiments/attention_logits.py --scale gpu   # d_model 256, 6 layers, BPE, one GPU
    python experiments/attention_logits.py --scale pod   # Moonlight-16B-A3B, Figure 7's 35k steps
    ... --quick (toy sizes, end to end in a minute) | --dry-run (configs and memory only)

The paper: Muon's max attention logit passes 100 in some layers early, then
comes down (logits above 100: about 1e-4 of them); AdamW keeps it lower. Here
each optimizer sweeps a quarter-decade grid of rates (3, on past an edge while
the best is at one), 2 seeds each, with MLA (Moonlight's proportions: latent
d/4, no-rope / rope / value head dims h, h/2, h); MHA (head dim h) trains at
each optimizer's best MLA rate (a scale's `grid` can sweep it too). Per run,
from metrics.jsonl (q k^T x scale, max over heads and batch, per layer): the
peak over training of the max over layers, the final one, the fraction above
the threshold (the paper's 100; --quick 1) and per-layer curves. The verdict
is on the peak's difference Muon minus AdamW, paired over seeds, at each
optimizer's best-loss rate (final_eval_loss seed means): reproduced if its 95%
interval is above 0; the same at matched rates. Cosine schedule, weight decay
0.1, dense SwiGLU MLPs (2.75 d) below pod.

- cpu: d_model 96, 3 layers, 3 heads of 32, byte-level stdlib, 200 steps x 16 x
  128 (0.41M tokens); MHA at the best MLA rates (the CPU budget): 20-24 runs of
  about 50 s on 2 idle cores (70-85 CPU-s each), 17-22 minutes.
- gpu: d_model 256, 6 layers, 4 heads of 64, BPE 8192 over --corpus python,
  2000 steps x 64 x 512 (66M tokens), bfloat16; MHA at the best MLA rates.
- pod: Moonlight-16B-A3B (MLA; and MHA, 16 heads of 128) at the paper's 4.2e-4
  for both, 35k steps of 2048 x 8K (2k warmup, the 5.2T-token cosine), one seed.
"""

from __future__ import annotations

import pathlib
import sysconfig

import numpy as np
import sweep

NAME = "attention_logits"
OPTIMIZERS = ("adamw", "muon")
CURVE_POINTS = 16  # logged points kept per run (results.json stays small)
KEYS = ("final_eval_loss", "max_logit_peak", "max_logit_final", "ratio_peak")
PAPER = {
    "setting": "Moonlight (16B MoE, MLA) with Muon vs Moonlight-A with AdamW, 2048 x 8K-token "
    "batches, lr 4.2e-4 for both; Figure 7: layer 1 over ~35k iterations",
    "threshold": 100.0,
    "ratio": 1e-4,  # the fraction of logits above 100 under Muon
    "claim": "Muon's max attention logit grows larger than AdamW's: above 100 in some layers "
    "early, then coming down; AdamW keeps it lower",
}


def _model(d: int, layers: int, heads: int, h: int) -> dict:
    return dict(d_model=d, n_layers=layers, first_k_dense=layers, n_heads=heads, head_dim=h,
                intermediate_size=round(2.75 * d / 8) * 8, kv_lora_rank=d // 4,
                qk_nope_head_dim=h, qk_rope_head_dim=h // 2, v_head_dim=h)  # fmt: skip


def scale_setup(scale: str, quick: bool, devices: int) -> dict:
    """Per attention its --model; the shared fields; each optimizer's starting
    rates; whether sweeps extend; the attentions swept on the grid; seeds."""
    seeds, grid, extend = (0, 1), ("mla",), True
    if quick:
        m, stdlib = _model(32, 1, 2, 16), pathlib.Path(sysconfig.get_paths()["stdlib"])
        base = dict(steps=12, batch_size=max(8, devices), seq_len=32, warmup_steps=2,
                    checkpoint_every=6, final_eval_tokens=2048, data=(str(stdlib / "json"),),
                    validation_fraction=0.1, large_logit_threshold=1.0)  # fmt: skip
        if scale == "gpu":  # its data path: a BPE over the sweep's shards
            base.update(tokenizer="bpe", bpe_vocab_size=320, dtype="bfloat16")
        start, extend = {"adamw": (0.0178,), "muon": (0.0178,)}, False
    elif scale == "cpu":
        m = _model(96, 3, 3, 32)  # grid ("mla", "mha"): MHA swept too, ~1.6x the runs
        base = dict(steps=200, batch_size=16, seq_len=128, warmup_steps=20)
        start = {"adamw": (0.00316, 0.00562, 0.01), "muon": (0.0178, 0.0316, 0.0562)}
    elif scale == "gpu":
        m = _model(256, 6, 4, 64)
        base = dict(steps=2000, batch_size=64, seq_len=512, warmup_steps=100, corpus="python",
                    tokenizer="bpe", bpe_vocab_size=8192, dtype="bfloat16")  # fmt: skip
        start = {"adamw": (1e-3, 1.78e-3, 3.16e-3), "muon": (1.78e-3, 3.16e-3, 5.62e-3)}
    else:  # Appendix D: stage 1's batch, one sequence per device per micro-batch
        base = dict(preset="moonlight-16b-a3b", steps=35000, batch_size=2048, seq_len=8192,
                    grad_accum=max(2048 // devices, 1), warmup_steps=2000, min_lr_ratio=0.1,
                    decay_steps=round(5.2e12 / (2048 * 8192)), corpus="python", tokenizer="bpe",
                    bpe_vocab_size=32768, dtype="bfloat16")  # fmt: skip
        start, extend, seeds = {o: (4.2e-4,) for o in OPTIMIZERS}, False, (0,)
        models = {"mla": {}, "mha": dict(attention="mha", head_dim=128)}
    if scale != "pod" or quick:
        models = {"mla": dict(m, attention="mla"), "mha": dict(m, attention="mha")}
    n = base["steps"]
    base = {**dict(preset="tiny", schedule="cosine", weight_decay=0.1, eval_every=n, eval_batches=4,
                   checkpoint_every=max(n // 5, 1), log_every=max(n // 100, 1),
                   large_logit_threshold=PAPER["threshold"]), **base}  # fmt: skip
    return dict(models=models, base=base, start=start, extend=extend, grid=grid, seeds=seeds)


def measure(run_dir, summary) -> dict:
    """From a run's metrics.jsonl: the peak over training of the max logit (max
    over layers; when, where), the final one, the large-logit ratio, curves."""
    from muonjax.train import read_metrics

    logs = {r["step"]: r for r in read_metrics(run_dir) if "max_attention_logit_per_layer" in r}
    steps = sorted(logs)  # a resumed run logs some steps twice: the last is kept
    per_layer = np.array([logs[s]["max_attention_logit_per_layer"] for s in steps], float)
    ratio = np.array([logs[s]["large_attention_logit_ratio"] for s in steps], float)
    i, layer = np.unravel_index(np.nanargmax(per_layer), per_layer.shape)
    keep = np.unique(np.linspace(0, len(steps) - 1, CURVE_POINTS).round().astype(int))
    return {"max_logit_peak": float(per_layer[i, layer]), "max_logit_peak_step": steps[i],
            "max_logit_peak_layer": int(layer), "max_logit_final": float(np.nanmax(per_layer[-1])),
            "ratio_peak": float(np.nanmax(ratio)), "ratio_final": float(ratio[-1]),
            "curve": {"step": [steps[k] for k in keep], "ratio": ratio[keep].tolist(),
                      "max_logit_per_layer": np.round(per_layer[keep], 3).tolist()}}  # fmt: skip


def fields(setup, attention, optimizer, lr, seed, mesh) -> dict:
    return dict(setup["base"], model=setup["models"][attention], optimizer=optimizer,
                learning_rate=lr, seed=seed, mesh=mesh)  # fmt: skip


def train(args, ledger: sweep.Ledger, setup: dict) -> dict:
    """Every run of the protocol (module docstring), trained or from the ledger."""
    runs = []

    def loss(att, optimizer, lr):
        new, mean = sweep.train_seeds(
            ledger, lambda seed: fields(setup, att, optimizer, lr, seed, args.mesh), setup["seeds"],
            f"{att} {optimizer} lr {lr:g}", measure, attention=att, optimizer=optimizer,
            learning_rate=lr)  # fmt: skip
        runs.extend(new)
        return mean

    for optimizer in OPTIMIZERS:
        sweeps = {att: sweep.sweep_rates(lambda lr: loss(att, optimizer, lr),  # noqa: B023
                                         setup["start"][optimizer], setup["extend"])
                  for att in setup["grid"]}  # fmt: skip
        best = sweep.best_rate(sweeps[setup["grid"][0]])
        for att in [a for a in setup["models"] if a not in setup["grid"] and best]:
            loss(att, optimizer, best)  # off the grid: at the grid's best rate only
    return {"runs": runs, "analysis": analyse(runs, setup["seeds"]), "models": setup["models"],
            "threshold": setup["base"]["large_logit_threshold"]}  # fmt: skip


def settings(runs) -> dict:
    """{(attention, optimizer): {rate: {seed: run}}} of the finished runs."""
    out = {}
    for r in runs:
        if r["final_eval_loss"] is not None:
            by_rate = out.setdefault((r["attention"], r["optimizer"]), {})
            by_rate.setdefault(r["learning_rate"], {})[r["seed"]] = r
    return out


def analyse(runs: list[dict], seeds) -> dict:
    """Per attention: each optimizer's sweep (estimates over seeds per rate), its
    best-loss rate (least seed mean among the rates whose every seed finished), and
    Muon - AdamW of the peak max logit, paired over seeds, at the best-loss rates
    and at every rate both have."""
    s, out = settings(runs), {}

    def compare(att, rates: dict) -> dict:
        peak = {o: {k: r["max_logit_peak"] for k, r in s[att, o][lr].items()} for o, lr in rates.items()}  # fmt: skip
        d = sweep.paired(peak["muon"], peak["adamw"])
        return {"rates": rates, "muon_minus_adamw": d.to_json(), "verdict": sweep.verdict(d, +1)}

    def point(lr, by_seed: dict) -> dict:
        estimates = {k: sweep.estimate(r[k] for r in by_seed.values()).to_json() for k in KEYS}
        return {"learning_rate": lr, "seeds": len(by_seed), **estimates}

    for att in dict.fromkeys(a for a, _ in s):  # in the order trained: MLA first
        grids = {o: s.get((att, o), {}) for o in OPTIMIZERS}
        means = {o: {lr: np.mean([r["final_eval_loss"] for r in g[lr].values()])
                     for lr in g if len(g[lr]) == len(seeds)} for o, g in grids.items()}  # fmt: skip
        best = {o: min(m, key=m.get, default=None) for o, m in means.items()}
        matched = sorted(set(means["muon"]) & set(means["adamw"]))
        out[att] = {
            "best_rate": best,
            "sweeps": {o: [point(lr, g[lr]) for lr in sorted(g)] for o, g in grids.items()},
            "at_best_rates": None if None in best.values() else compare(att, best),
            "at_matched_rates": [compare(att, dict.fromkeys(OPTIMIZERS, lr)) for lr in matched],
        }
    return out


def comparisons(x: dict) -> list[tuple[str, dict]]:
    """An attention's comparisons: at the best-loss rates, then at (other) matched rates."""
    best = [("best-loss", x["at_best_rates"])] if x["at_best_rates"] else []
    return best + [("matched", c) for c in x["at_matched_rates"] if c["rates"] != x["best_rate"]]


def markdown(results: dict) -> str:
    cell = lambda e, f=".3g": f"{e['mean']:{f}}" + (f" ± {e['half_width']:{f}}" if e["n"] > 1 else "")  # fmt: skip
    lines = [sweep.table_row("attention", "optimizer", "lr", "final eval loss", "peak max logit",
                             "final max logit", f"peak ratio > {results['threshold']:g}"),
             sweep.table_row(*["---"] * 7)]  # fmt: skip
    compared = [sweep.table_row("attention", "rates: Muon / AdamW", "peak max logit, Muon - AdamW",
                                "verdict (paper: Muon larger)"), sweep.table_row(*["---"] * 4)]  # fmt: skip
    for att, x in results["analysis"].items():
        for o, points in x["sweeps"].items():
            for p in points:
                lr = f"{p['learning_rate']:g}{' (best)' if p['learning_rate'] == x['best_rate'][o] else ''}"
                lines.append(sweep.table_row(att, o, lr, cell(p[KEYS[0]], ".4f"),
                                             *(cell(p[k]) for k in KEYS[1:])))  # fmt: skip
        for kind, c in comparisons(x):
            rates = f"{c['rates']['muon']:g} / {c['rates']['adamw']:g} ({kind})"
            d = sweep.estimate(c["muon_minus_adamw"]["values"])
            compared.append(sweep.table_row(att, rates, d, c["verdict"]))
    return "\n".join([*lines, "", *compared])


def plot(results: dict, path: pathlib.Path) -> None:
    """Peak max logit and final eval loss against the rate (seed means, 95%
    intervals, each optimizer's best-loss rate starred); the paired differences of
    the peak at the best-loss and matched rates."""
    a, colors = results["analysis"], {"adamw": "tab:red", "muon": "tab:blue"}  # the paper's
    fig, (peak_ax, loss_ax, diff_ax) = sweep.figure(1, 3, (17, 5))
    for att, x in a.items():
        for o, points in x["sweeps"].items():
            rates, best = [p["learning_rate"] for p in points], x["best_rate"][o]
            for ax, key in ((peak_ax, "max_logit_peak"), (loss_ax, "final_eval_loss")):
                e = [sweep.estimate(p[key]["values"]) for p in points]
                sweep.error_bars(ax, rates, e, f"{o} {att}", color=colors[o],
                                 linestyle="-" if att == "mla" else "--")  # fmt: skip
                if best in rates:
                    ax.plot(best, e[rates.index(best)].mean, "*", ms=18, color=colors[o])
    sweep.paper_line(peak_ax, results["threshold"], f"threshold {results['threshold']:g}")
    found = [(f"{att} {kind}\n{c['rates']['muon']:g} / {c['rates']['adamw']:g}", c)
             for att, x in a.items() for kind, c in comparisons(x)]  # fmt: skip
    diffs = [sweep.estimate(c["muon_minus_adamw"]["values"]) for _, c in found]
    sweep.error_bars(diff_ax, range(len(found)), diffs, color="k", linestyle="none")
    diff_ax.axhline(0, color="0.4", lw=1)
    diff_ax.set_xticks(range(len(found)), [label for label, _ in found], fontsize=8)
    peak_ax.set(xscale="log", yscale="log", xlabel="learning rate",
                title="peak max logit (max over layers; star: best-loss rate)")  # fmt: skip
    loss_ax.set(xscale="log", xlabel="learning rate", title="final eval loss")
    diff_ax.set(xlim=(-0.5, len(found) - 0.5), ylabel="peak max logit, Muon - AdamW",
                title="paired over seeds, at rates Muon / AdamW (> 0: the paper's)")  # fmt: skip
    sweep.save(fig, path, results, "Attention logits, App. D", f"{len(results['runs'])} runs")


def configs(args, setup: dict) -> dict:
    """--dry-run's configs: each attention and optimizer at its first rate."""
    from muonjax.train import TrainConfig

    return {f"{att}-{o}": TrainConfig(**fields(setup, att, o, setup["start"][o][0], 0, args.mesh))
            for att in setup["models"] for o in OPTIMIZERS}  # fmt: skip


FINDING = sweep.Finding(NAME, __doc__, PAPER, scale_setup, configs, train, markdown, plot)
main = FINDING.main

if __name__ == "__main__":
    FINDING.command()
