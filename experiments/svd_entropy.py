"""SVD entropy: Figure 4 of "Muon is Scalable for LLM Training" (Sec. 3.4).

    python experiments/svd_entropy.py                # --scale cpu: ~18 runs, ~20 min
    python experiments/svd_entropy.py --scale gpu    # an 8-layer MoE, BPE: ~2-3 min a run
    python experiments/svd_entropy.py --scale pod    # Moonlight-16B-A3B, 1.2T tokens
    python experiments/svd_entropy.py --quick        # toy sizes, end to end
    ... --dry-run                                    # the configs and their memory only

H = -1/log(n) sum p_i log p_i, p_i = s_i^2 / sum s_j^2 over a matrix's n singular
values: 1 when every direction carries the same energy, 0 at rank one. The paper
(Moonlight vs Moonlight-A) finds each group's mean entropy (AttnQO, AttnKV,
Experts, SharedExperts, Router, Dense; each layer's and expert's matrix its own)
higher under Muon at every checkpoint, and > 90% of the matrices higher at 1.2T
tokens. A random init already has H ~0.9, so we also measure what training
added, W - W0 (W0: the checkpoint of a 0-step run of the seed, checked against
each run's logged step-0 entropies).

Protocol: a Moonlight-shaped MoE (MLA, a dense first layer, then routed and
shared experts), both optimizers on the same tokens, cosine schedule, weight
decay 0.1. cpu, gpu: each optimizer swept on a quarter-decade grid from 3 rates,
extended until its best (seed mean of final_eval_loss) is inside; pod: both at
Moonlight's 4.2e-4. SEEDS at every rate. At each optimizer's best rate, per seed
and group: the mean entropy of W and of W - W0 at 10 checkpoints, each with an
eval loss; Muon - AdamW paired over seeds (sweep.verdict; paper: > 0) at the
end and at matched loss (each optimizer's first checkpoint at or below the
higher final eval loss of the two, AdamW's as a rule). cpu: the tiny preset (d
64, 8 experts of 64, top 2), bytes, 500 steps x 16 x 128 (1M tokens; ~60 s a run
alone on 2 cores, 2 inits + 12 runs + ~4 to extend a grid). gpu: d 256, 8
layers, 16 experts of 256 (26M parameters, 7M active, non-embedding), BPE 8192
on the python corpus, 2000 steps x 64 x 512 (65M tokens). pod: Moonlight-16B-A3B
at 4096 x 8K, cosine toward 5.2T tokens, stopped at Figure 4's 1.2T. The ledger
(OUT/ledger.json, OUT/runs/) resumes a stopped sweep.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sysconfig

import numpy as np
import sweep

NAME = "svd_entropy"
OPTIMIZERS, SEEDS, CHECKPOINTS = ("adamw", "muon"), (0, 1), 10
GROUPS = ("AttnQO", "AttnKV", "Experts", "SharedExperts", "Router", "Dense")  # FIGURE4_GROUPS
KINDS = {"W": "W", "dW": "W - W0"}

PAPER = {
    "setting": "Moonlight (Muon) vs Moonlight-A (AdamW), MoE 2.24B activated / 15.29B total "
               "non-embedding parameters, checkpoints over 1.2T tokens (Figure 4)",
    "claims": {"every_group": "across all checkpoints and all groups, Muon's SVD entropy is higher",
               "router": "the discrepancy is more significant in the router weights",
               "per_matrix": "over 90% of the matrices have a higher SVD entropy under Muon (1.2T tokens)"},
    "sign": +1,  # Muon - AdamW > 0 in every group
    "per_matrix_fraction": 0.9,
    "figure_y_range": {"AttnQO": (0.8, 0.9), "AttnKV": (0.85, 0.95), "Experts": (0.93, 0.95),
                       "SharedExperts": (0.9, 0.94), "Router": (0.7, 0.9), "Dense": (0.95, 0.98)},
    "notes": "the paper sampled 3 of 64 experts per layer (ours: all); its Dense is the first "
             "dense layer (ours: that layer's MLP; its attention counts in AttnQO / AttnKV)",
}  # fmt: skip
TOY = dict(d_model=32, n_layers=2, first_k_dense=1, intermediate_size=64, n_heads=2,
           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
           n_routed_experts=4, moe_intermediate_size=16)  # fmt: skip


def scale_setup(scale: str, quick: bool, devices: int) -> dict:
    """Shared TrainConfig fields, each optimizer's first rates, whether sweeps extend."""
    if quick:  # toy sizes at every scale: gpu's data path (BPE), pod's 8 devices
        data = (str(pathlib.Path(sysconfig.get_paths()["stdlib"]) / "json"),)
        base = dict(preset="tiny", model=TOY, batch_size=max(8, devices), seq_len=32, steps=10,
                    warmup_steps=2, eval_batches=1, final_eval_tokens=2048, data=data,
                    validation_fraction=0.1)  # fmt: skip
        if scale == "gpu":
            base.update(tokenizer="bpe", bpe_vocab_size=320, dtype="bfloat16")
        start = {"adamw": (0.01,), "muon": (0.0316,)}
        return dict(base=base, start=start, extend=False, checkpoints=5, seeds=SEEDS)
    if scale == "cpu":
        base = dict(preset="tiny", batch_size=16, seq_len=128, steps=500, warmup_steps=20,
                    eval_batches=16)  # fmt: skip
        start = {"adamw": (0.01, 0.0178, 0.0316), "muon": (0.0316, 0.0562, 0.1)}
        return dict(base=base, start=start, extend=True, seeds=SEEDS)
    if scale == "gpu":
        base = dict(preset="small", model=dict(n_layers=8), batch_size=64, seq_len=512,
                    steps=2000, warmup_steps=100, eval_batches=8, corpus="python",
                    tokenizer="bpe", bpe_vocab_size=8192, dtype="bfloat16")  # fmt: skip
        start = {"adamw": (3.16e-3, 5.62e-3, 0.01), "muon": (5.62e-3, 0.01, 0.0178)}
        return dict(base=base, start=start, extend=True, seeds=SEEDS)
    per_step = 4096 * 8192  # Moonlight's batch after its first 200B tokens
    base = dict(preset="moonlight-16b-a3b", model={}, batch_size=4096, seq_len=8192,
                grad_accum=max(4096 // devices, 1), steps=round(1.2e12 / per_step),
                decay_steps=round(5.2e12 / per_step), warmup_steps=2000, corpus="python",
                tokenizer="bpe", bpe_vocab_size=32768, dtype="bfloat16")  # fmt: skip
    return dict(base=base, start={o: (4.2e-4,) for o in OPTIMIZERS}, extend=False, seeds=SEEDS)


def run_fields(setup: dict, optimizer: str, lr: float, seed: int, mesh) -> dict:
    steps = setup["base"]["steps"]
    every = max(steps // setup.get("checkpoints", CHECKPOINTS), 1)
    return dict(setup["base"], optimizer=optimizer, learning_rate=lr, seed=seed, mesh=mesh,
                checkpoint_every=every, eval_every=every, keep_checkpoints=steps // every + 1,
                log_every=every, svd_entropy_every=steps)  # fmt: skip


# --- measuring ---------------------------------------------------------------------------


@functools.cache
def _svd_entropy():
    import jax

    from muonjax.models.spectra import svd_entropy

    return jax.jit(svd_entropy)


def entropies(params) -> dict[str, np.ndarray]:
    """{Figure 4 group: the entropy of each of its matrices, in a fixed order},
    leaf by leaf (a pod's model need not fit one device at once)."""
    by = {}
    for group, leaves in sweep.leaves_by_group(params).items():
        for leaf in leaves:
            h = np.asarray(_svd_entropy()(leaf), float).ravel()
            by.setdefault({"AttnQ": "AttnQO", "AttnO": "AttnQO"}.get(group, group), []).append(h)
    return {g: np.concatenate(by[g]) for g in GROUPS if g in by}


def means(h: dict) -> dict[str, float]:
    return {g: float(v.mean()) for g, v in h.items()}


def measure(run_dir, w0_dir) -> dict:
    """Per checkpoint: its eval loss and the group means of W and W - W0; each
    matrix's entropies at the last; the trainer's step-0 means (the check on W0)."""
    import jax

    from muonjax.train import read_metrics

    metrics, points, w0 = read_metrics(run_dir), [], sweep.params_at(w0_dir)
    evals = {r["step"]: r["eval_loss"] for r in metrics if "eval_loss" in r}
    for step in sweep.checkpoint_steps(run_dir):
        w = sweep.params_at(run_dir, step)
        h = {"W": entropies(w), "dW": entropies(jax.tree.map(np.subtract, w, w0))}
        points.append(
            {"step": step, "eval_loss": evals.get(step), **{k: means(x) for k, x in h.items()}}
        )
    step0 = next(r for r in metrics if r["step"] == 0 and "svd_entropy_Router" in r)
    return {
        "checkpoints": points,
        "step0": {g: step0[f"svd_entropy_{g}"] for g in GROUPS},
        "per_matrix": {k: np.concatenate(list(x.values())).tolist() for k, x in h.items()},
    }


def train(args, ledger: sweep.Ledger, setup: dict) -> dict:
    """Every run (module docstring), W0's group means per seed, and the analysis."""
    runs, inits, w0 = [], {}, {}
    prepare = ledger.tokenized if setup["base"].get("tokenizer") == "bpe" else dict
    for seed in SEEDS:  # W0: a 0-step run's checkpoint (the init does not depend on the optimizer)
        fields = prepare(dict(run_fields(setup, "adamw", 0.01, seed, args.mesh), steps=0,
                              final_eval_tokens=0))  # fmt: skip
        r = ledger.train(fields, f"W0 seed {seed} (0 steps, no eval)",
                         lambda run_dir, _: {"W": means(entropies(sweep.params_at(run_dir)))})  # fmt: skip
        w0[seed], inits[seed] = ledger.out / "runs" / r["key"], r["W"]

    def loss(optimizer, lr):
        for seed in SEEDS:
            r = ledger.train(prepare(run_fields(setup, optimizer, lr, seed, args.mesh)),
                             f"{optimizer} lr {lr:g} seed {seed}",
                             lambda run_dir, _, w=w0[seed]: measure(run_dir, w))  # fmt: skip
            runs.append(dict(r, optimizer=optimizer, learning_rate=lr, seed=seed))
        losses = [r["final_eval_loss"] for r in runs[-len(SEEDS) :]]
        return None if None in losses else float(np.mean(losses))

    for optimizer in OPTIMIZERS:
        loss_at = functools.partial(loss, optimizer)
        sweep.sweep_rates(loss_at, setup["start"][optimizer], setup["extend"])
    # seed keys as strings, as in results.json
    return json.loads(
        json.dumps({"base": setup["base"], "runs": runs, "analysis": analyse(runs, inits)})
    )


# --- the analysis ------------------------------------------------------------------------


def analyse(runs: list[dict], inits: dict) -> dict:
    """Muon - AdamW at their best rates, paired over seeds, per '{end|matched}
    {W|dW} GROUP'; the fraction of matrices higher under Muon at the end."""
    rates = {o: sweep.best_rate(sweep.rate_means(runs, SEEDS, optimizer=o)) for o in OPTIMIZERS}
    at = {o: {r["seed"]: r for r in runs if (r["optimizer"], r["learning_rate"]) == (o, rates[o])}
          for o in OPTIMIZERS}  # fmt: skip
    seeds = sorted(set(at["adamw"]) & set(at["muon"]))
    values, steps, targets = {}, {o: {} for o in OPTIMIZERS}, {}
    for s in seeds:
        targets[s] = max(at[o][s]["checkpoints"][-1]["eval_loss"] for o in OPTIMIZERS)
        for o in OPTIMIZERS:
            points = at[o][s]["checkpoints"]
            match = next(p for p in points if p["eval_loss"] <= targets[s])
            steps[o][s] = match["step"]
            for when, p in (("end", points[-1]), ("matched", match)):
                for kind, g, h in ((k, g, h) for k in KINDS for g, h in p[k].items()):
                    values.setdefault(f"{when} {kind} {g}", {o: {} for o in OPTIMIZERS})[o][s] = h
    comparisons = {}
    for key, v in values.items():
        d = sweep.paired(v["muon"], v["adamw"])
        comparisons[key] = {**{o: sweep.estimate(v[o].values()).to_json() for o in OPTIMIZERS},
                            "difference": d.to_json(), "verdict": sweep.verdict(d, PAPER["sign"])}  # fmt: skip
    higher = {}
    for kind in KINDS:
        f = [np.mean(np.greater(at["muon"][s]["per_matrix"][kind], at["adamw"][s]["per_matrix"][kind]))
             for s in seeds]  # fmt: skip
        over = sweep.estimate(np.subtract(f, PAPER["per_matrix_fraction"])) if f else None
        higher[kind] = {"fraction": f and sweep.estimate(f).to_json(),
                        "verdict": over and sweep.verdict(over, +1)}  # fmt: skip
    gap = max((abs(r["step0"][g] - inits[r["seed"]][g]) for r in runs if "step0" in r
               for g in inits[r["seed"]]), default=None)  # fmt: skip
    return {"learning_rates": rates, "seeds": seeds, "target_loss": targets, "matched_steps": steps,
            "comparisons": comparisons, "per_matrix_higher": higher, "init": inits,
            "init_check_max_gap": gap}  # fmt: skip


# --- report ------------------------------------------------------------------------------

COLUMNS = [f"{w} {k}" for w in ("end", "matched") for k in KINDS]


def markdown(results: dict) -> str:
    a = results["analysis"]
    c, h = a["comparisons"], a["per_matrix_higher"]
    lines = [sweep.table_row("group", "init W", "AdamW W / W-W0, end", "Muon W / W-W0, end",
                             *(f"Muon - AdamW, {x}" for x in COLUMNS)),
             sweep.table_row(*["---"] * (4 + len(COLUMNS)))]  # fmt: skip
    for g in (g for g in GROUPS if f"end W {g}" in c):
        own = [" / ".join(f"{c[f'end {k} {g}'][o]['mean']:.3f}" for k in KINDS) for o in OPTIMIZERS]
        diffs = [f"{sweep.estimate(c[f'{x} {g}']['difference']['values'])} {c[f'{x} {g}']['verdict']}"
                 for x in COLUMNS]  # fmt: skip
        init = np.mean([i[g] for i in a["init"].values()])
        lines.append(sweep.table_row(g, f"{init:.3f}", *own, *diffs))
    share = {
        k: f"{v['fraction']['mean']:.1%} ({v['verdict']})" if v["fraction"] else "-"
        for k, v in h.items()
    }
    lines += ["", f"matrices higher under Muon at the end (paper: > 90%): W {share['W']}, W - W0 "
              f"{share['dW']}; best rates {a['learning_rates']}; matched-loss steps "
              f"{a['matched_steps']} (target eval losses {a['target_loss']})"]  # fmt: skip
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
    a, (fig, axes) = results["analysis"], sweep.figure(2, 4, (18, 8))
    for o, color in zip(OPTIMIZERS, ("tab:red", "tab:blue")):
        for r in (r for r in results["runs"] if r["optimizer"] == o and "checkpoints" in r
                  and r["learning_rate"] == a["learning_rates"][o]):  # fmt: skip
            label, points = f"{o} lr {r['learning_rate']:g} seed {r['seed']}", r["checkpoints"]
            steps = [0] + [p["step"] for p in points]
            for g, ax in zip(GROUPS, axes.flat):
                ax.plot(steps, [a["init"][str(r["seed"])].get(g)] + [p["W"].get(g) for p in points],
                        "-", color=color, label=f"{label}, W")  # fmt: skip
                ax.plot(steps, [0] + [p["dW"].get(g) for p in points], "--", color=color,
                        label=f"{label}, W - W0", alpha=0.6)  # fmt: skip
                ax.set_title(f"{g}: mean SVD entropy")
            axes[1, 2].plot(steps[1:], [p["eval_loss"] for p in points], color=color, label=label)
            axes[1, 2].axvline(a["matched_steps"][o][str(r["seed"])], color=color, ls=":")
    axes[1, 2].set(title="eval loss (dotted: matched-loss checkpoints)", xlabel="step")
    for j, g in enumerate(g for g in GROUPS if f"end W {g}" in a["comparisons"]):
        found = [
            sweep.estimate(a["comparisons"][f"{x} {g}"]["difference"]["values"]) for x in COLUMNS
        ]
        sweep.error_bars(axes[1, 3], [i + j / 8 for i in range(4)], found, label=g, ls="none")
    axes[1, 3].axhline(0, color="0.4", lw=1)
    axes[1, 3].set(xticks=[i + 0.3 for i in range(4)], xticklabels=COLUMNS,
                   title="Muon - AdamW, 95% over seeds (paper: > 0)")  # fmt: skip
    sweep.save(
        fig,
        path,
        results,
        "SVD entropy, Fig. 4",
        f"MoE, seeds {SEEDS}, {len(results['runs'])} runs",
        legends=axes.flat[[0, 6, 7]],
    )


def configs(args, setup: dict) -> dict:
    """--dry-run's configs: each optimizer at its first rate."""
    from muonjax.train import TrainConfig

    return {o: TrainConfig(**run_fields(setup, o, setup["start"][o][0], 0, args.mesh))
            for o in OPTIMIZERS}  # fmt: skip


FINDING = sweep.Finding(NAME, __doc__, PAPER, scale_setup, configs, train, markdown, plot)
main = FINDING.main

if __name__ == "__main__":
    FINDING.command()
