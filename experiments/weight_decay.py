"""Weight decay: Figure 2 of "Muon is Scalable for LLM Training" (Sec. 2.2).

    python experiments/weight_decay.py [--scale cpu|gpu|pod] [--quick] [--dry-run]

Over-trained far past compute-optimal on a warmup-stable-decay schedule (the
peak rate until the last 20%, then linear to 0.1x), so that vanilla Muon's
weights are free to keep growing (the old cosine decay stopped them): Muon
with weight decay 0.1 (Eq. 3, the Moonlight recipe) and without (Eq. 3's
lambda 0; its AdamW group keeps 0.1) at one rate on 3 seeds, and AdamW (wd
0.1) at the best seed mean of a quarter-decade grid (extended past an edge)
on 2 seeds. Measured: eval loss every 1/40 of the run, and from 12
checkpoints each layer's weight RMS (its hidden matrices) and output RMS (the
residual stream after the block, on 16 held-out windows). Verdicts on paired
differences over seeds, vanilla - with decay: (a) final_eval_loss > 0; (b)
the log growth of the hidden matrices' RMS over the run's second half > 0; (c)
the same for the largest layer-output RMS; (d) AdamW - Muon with decay > 0;
(e) vanilla's early lead < 0, at the step of its largest mean lead (picked
after the fact: optimistic). Also the step from which Muon with decay stays
ahead, per seed (paper: somewhere between 31% and 87% of the run).

cpu: d16 x 2 layers (6.7k non-embedding parameters), byte-level stdlib, 1200
steps x 32 x 128 = 4.9M tokens (36x the 20 tokens/parameter optimum, 0.4
epochs: no text repeats), Muon at 0.0316 (compute_efficiency's cpu Muon
optimum at 1x is 0.0316-0.0562; longer runs want less), AdamW's grid from
0.01-0.0316: 12 runs (+2 per grid extension) of ~2 min, ~25-35 min on 2 idle
cores. gpu: d128 x 4 (0.8M), BPE 8192 on the python corpus, 4900 x 64 x 512 =
160M tokens (10x; ~5 epochs of the corpus), Muon at 0.01, minutes a run. pod:
the paper's setting: 822M (Table 2's row, dense), 100B tokens (6x) at 160 x
8K, Table 2's rate 8.825e-4 for every run (as the paper), 2 Muon seeds and 1
AdamW (5 runs); its data needs 100B tokens (the python corpus would repeat).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import sysconfig

import numpy as np
import sweep

NAME = "weight_decay"
CURVES = {
    "muon_wd": ("Muon w/ weight decay", dict(optimizer="muon", weight_decay=0.1)),
    # vanilla: Eq. 3's lambda 0 on Muon's matrices alone (its AdamW group keeps 0.1)
    "muon": (
        "Muon w/o weight decay",
        dict(optimizer="muon", weight_decay=0, weight_decay_adamw=0.1),
    ),
    "adamw": ("AdamW", dict(optimizer="adamw", weight_decay=0.1)),
}
COLORS = {"adamw": "tab:green", "muon": "tab:red", "muon_wd": "tab:blue"}
PAPER = {
    "setting": "800M dense (Table 2's 822M row), 100B tokens (~5x compute-optimal), validation "
    "loss against iterations (Figure 2); one run per curve",
    "claims": {  # the claim, and the sign of our paired difference that supports it
        "late": ("Muon w/ wd ends below vanilla Muon (over-trained)", +1),
        "weight_rms": ("w/o wd the weight RMS keeps growing (past bf16's precise range)", +1),
        "layer_output_rms": ("w/o wd the layer-output RMS keeps growing", +1),
        "vs_adamw": ("Muon w/ wd ends below AdamW", +1),
        "early": ("vanilla Muon converges faster at first", -1),
    },
    # Figure 2's inset, vanilla - with decay: -0.023 at iteration 24k, +0.017 at 66k (of ~76k)
    "inset": {
        "vanilla_ahead": {"by": 0.023, "fraction": 24000 / 76294},
        "muon_wd_ahead": {"by": 0.017, "fraction": 66000 / 76294},
    },
}
MEASURED = {  # our measure of each claim
    "late": "final eval loss, w/o - w/ wd",
    "weight_rms": "log growth of the hidden matrices' RMS over the 2nd half, w/o - w/ wd",
    "layer_output_rms": "log growth of the largest layer-output RMS, 2nd half, w/o - w/ wd",
    "vs_adamw": "final eval loss, AdamW - Muon w/ wd",
    "early": "eval loss w/o - w/ wd at vanilla's largest mean lead (picked after the fact)",
}


def scale_setup(scale: str, quick: bool, devices: int) -> dict:
    """Shared TrainConfig fields, Muon's rate, AdamW's first grid, the seeds."""
    bpe = dict(corpus="python", tokenizer="bpe", dtype="bfloat16")
    if quick:
        json_package = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "json"
        base = dict(model=sweep.dense_model(16, 2, 2), batch_size=max(8, devices), seq_len=32, steps=24,
                    warmup_steps=2, eval_batches=1, final_eval_tokens=2048,
                    data=(str(json_package),), validation_fraction=0.1)  # fmt: skip
        if scale == "gpu":
            base.update(tokenizer="bpe", bpe_vocab_size=320, dtype="bfloat16")
        seeds = (0, 1) if scale == "cpu" else (0,)  # gpu and pod: their data paths, once
        return dict(base=base, muon_lr=0.0316, adamw=(0.0316,), seeds=seeds, adamw_seeds=(0,),
                    checkpoints=4)  # fmt: skip
    if scale == "cpu":
        base = dict(
            model=sweep.dense_model(16, 2, 2),
            batch_size=32,
            seq_len=128,
            steps=1200,
            warmup_steps=20,
        )
        return dict(base=base, muon_lr=0.0316, adamw=(0.01, 0.0178, 0.0316), seeds=(0, 1, 2),
                    adamw_seeds=(0, 1), extend=True)  # fmt: skip
    if scale == "gpu":
        base = dict(bpe, model=sweep.dense_model(128, 4, 4), batch_size=64, seq_len=512, steps=4900,
                    warmup_steps=200, eval_batches=8, bpe_vocab_size=8192)  # fmt: skip
        return dict(base=base, muon_lr=0.01, adamw=(3.16e-3, 5.62e-3, 0.01), seeds=(0, 1, 2),
                    adamw_seeds=(0, 1), extend=True)  # fmt: skip
    import compute_efficiency as ce  # Table 2's 822M row, as that script builds it

    base = dict(bpe, model=ce.table2_model(ce.PAPER["table2"]["822M"]), batch_size=160,
                seq_len=8192, steps=76294, warmup_steps=1000, bpe_vocab_size=32768)  # fmt: skip
    return dict(base=base, muon_lr=8.825e-4, adamw=(8.825e-4,), seeds=(0, 1), adamw_seeds=(0,))


def fields_of(setup: dict, curve: str, lr: float, seed: int, mesh) -> dict:
    """A run's TrainConfig fields: WSD; 40 evaluations, 100 logs, 12 checkpoints (all kept)."""
    steps, checkpoints = setup["base"]["steps"], setup.get("checkpoints", 12)
    return dict(setup["base"], **CURVES[curve][1], preset="tiny", learning_rate=lr, seed=seed,
                mesh=mesh, schedule="wsd", decay_fraction=0.2, eval_every=max(steps // 40, 1),
                log_every=max(steps // 100, 1), checkpoint_every=steps // checkpoints,
                keep_checkpoints=checkpoints + 1)  # fmt: skip


# --- measurements from a run's files -----------------------------------------------------


@functools.lru_cache
def layer_output_rms_fn(model_config):
    """f(params, tokens_BL) -> the RMS of the residual stream after each block (dense models)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from muonjax.models import Transformer
    from muonjax.models.transformer import LAYERS

    graphdef, state = nnx.split(Transformer(model_config, rngs=nnx.Rngs(0)), nnx.Param)

    @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=(nnx.Carry, 0),
              transform_metadata={nnx.PARTITION_NAME: LAYERS})  # fmt: skip
    def blocks(block, x_BLD, positions_BL):
        y_BLD, _ = block(x_BLD, positions_BL)
        return y_BLD, jnp.sqrt(jnp.mean(jnp.square(y_BLD.astype(jnp.float32))))

    @jax.jit
    def rms(params, tokens_BL):
        model = nnx.merge(graphdef, params)
        positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
        x_BLD = model.embed(tokens_BL).astype(model_config.dtype)
        return blocks(model.dense_layers, x_BLD, positions_BL)[1]

    def f(params, tokens_BL):
        nnx.replace_by_pure_dict(state, params)
        return rms(state, jnp.asarray(tokens_BL, jnp.int32)).tolist()

    return f


_WINDOWS: dict = {}  # (data, corpus, tokenizer, seq_len) -> held-out windows


def held_out_windows(config, run_dir: pathlib.Path) -> np.ndarray:
    """16 windows (inputs) spread over the held-out text, as evaluations read it."""
    from muonjax.train import pipeline
    from muonjax.train.data import load_data

    key = (config.data, config.corpus, config.tokenizer, config.seq_len)
    if key not in _WINDOWS:
        held_out = load_data(config, run_dir).validation_tokens
        batch = pipeline.eval_batches(pipeline.eval_rows(held_out, config.seq_len, False), 16, 1)[0]
        _WINDOWS[key] = batch[(batch >= 0).all(axis=1), :-1]
    return _WINDOWS[key]


def measure(run_dir: pathlib.Path, summary) -> dict:
    """The eval-loss curve (metrics.jsonl); per checkpoint, each layer's weight RMS
    (its hidden matrices) and output RMS (on held-out windows)."""
    from muonjax.models.spectra import hidden_matrices
    from muonjax.train import TrainConfig, read_metrics

    evals = [r for r in read_metrics(run_dir) if "eval_loss" in r]
    saved = json.loads((run_dir / "config.json").read_text())
    config = TrainConfig.from_json(saved["train"])
    output_rms = layer_output_rms_fn(config.model_config(saved["model"]["vocab_size"]))
    steps, weight, output = sweep.checkpoint_steps(run_dir), [], []
    for step in steps:
        params = sweep.strip_values(sweep.params_at(run_dir, step))
        stacks = [np.asarray(leaf, np.float32) for _, _, leaf in hidden_matrices(params)]
        squares = sum(np.sum(np.square(s), axis=(1, 2)) for s in stacks)  # per layer
        weight.append(np.sqrt(squares / sum(s[0].size for s in stacks)).tolist())
        output.append(output_rms(params, held_out_windows(config, run_dir)))
    series = {"eval_step": [r["step"] for r in evals], "eval_loss": [r["eval_loss"] for r in evals]}
    checkpoints = {"step": steps, "weight_rms": weight, "output_rms": output}
    return {"series": series, "checkpoints": checkpoints}


# --- the protocol ------------------------------------------------------------------------


def train(args, ledger: sweep.Ledger, setup: dict) -> dict:
    """The Muon pair at its rate on every seed, then AdamW's grid (extended past an
    edge); the setting's size and the analysis."""
    from muonjax.models import param_counts

    runs = []

    def loss(curve: str, lr: float, seeds) -> float | None:
        new, mean = sweep.train_seeds(
            ledger, lambda seed: fields_of(setup, curve, lr, seed, args.mesh), seeds,
            f"{curve} lr {lr:g}", measure, curve=curve, learning_rate=lr)  # fmt: skip
        runs.extend(new)
        return mean

    for curve in ("muon_wd", "muon"):
        loss(curve, setup["muon_lr"], setup["seeds"])
    sweep.sweep_rates(lambda lr: loss("adamw", lr, setup["adamw_seeds"]), setup["adamw"],
                      setup.get("extend", False))  # fmt: skip
    params = param_counts(configs(args, setup)["muon"].model_config())["total_non_embedding"]
    b = setup["base"]
    tokens = b["steps"] * b["batch_size"] * b["seq_len"]
    size = {
        "non_embedding_params": params,
        "tokens": tokens,
        "over_training": tokens / (20 * params),
    }
    return {"setup": {**setup, **size}, "runs": runs, "analysis": analyse(runs)}


# --- the analysis ------------------------------------------------------------------------


def by_seed(runs: list[dict], curve: str, lr: float | None = None) -> dict:
    return {r["seed"]: r for r in runs if r["curve"] == curve and r["status"] == "done"
            and lr in (None, r["learning_rate"])}  # fmt: skip


def adamw_grid(runs: list[dict]) -> dict:
    """{rate: AdamW's seed mean of final_eval_loss, None if a seed diverged}."""
    grid = {}
    for r in runs:
        if r["curve"] == "adamw":
            grid.setdefault(r["learning_rate"], []).append(r["final_eval_loss"])
    return {lr: None if None in v else float(np.mean(v)) for lr, v in sorted(grid.items())}


def growth(steps, values) -> float:
    """log(value at the end / value at the step nearest half the run): > 0, still growing."""
    half = int(np.argmin(np.abs(np.asarray(steps) - steps[-1] / 2)))
    return math.log(values[-1] / values[half])


def crossing(steps, difference) -> int | None:
    """The step from which `difference` (vanilla - w/ wd) stays > 0; None if it ends <= 0."""
    if difference[-1] <= 0:
        return None
    i = len(difference) - 1
    while i > 0 and difference[i - 1] > 0:
        i -= 1
    return steps[i]


POOL = {  # a checkpoint's per-layer RMS -> one number
    "weight_rms": lambda x: np.sqrt(np.mean(np.square(x), 1)),  # of all the hidden matrices
    "output_rms": lambda x: np.max(x, 1),  # the largest layer's
}


def analyse(runs: list[dict]) -> dict:
    """Per curve, estimates over seeds; the claims' paired differences and verdicts;
    the eval-loss difference over the run, and where Muon w/ wd overtakes for good."""
    grid = adamw_grid(runs)
    lr = min((x for x in grid if grid[x] is not None), key=grid.get, default=None)
    rs = {c: by_seed(runs, c, lr if c == "adamw" else None) for c in CURVES}
    per = {c: {"final": {s: r["final_eval_loss"] for s, r in x.items()}} for c, x in rs.items()}
    for c, x in rs.items():
        for k, pool in POOL.items():
            ck = {s: r["checkpoints"] for s, r in x.items()}
            per[c][f"{k}_growth"] = {s: growth(p["step"], pool(p[k])) for s, p in ck.items()}
    seeds = sorted(set(rs["muon"]) & set(rs["muon_wd"]))
    first = rs["muon"][seeds[0]]
    steps, total = first["series"]["eval_step"], first["fields"]["steps"]
    curve = lambda c, s: np.array(rs[c][s]["series"]["eval_loss"])
    loss = {c: {s: curve(c, s) for s in seeds} for c in ("muon", "muon_wd")}
    at = lambda c, i: {s: loss[c][s][i] for s in seeds}
    per_step = [sweep.paired(at("muon", i), at("muon_wd", i)) for i in range(len(steps))]
    lead = int(np.argmin([e.mean for e in per_step]))
    crossings = {s: crossing(steps, loss["muon"][s] - loss["muon_wd"][s]) for s in seeds}
    crossed = [c / total for c in crossings.values() if c is not None]
    pair = lambda a, key: sweep.paired(per[a][key], per["muon_wd"][key])
    differences = {"late": pair("muon", "final"), "weight_rms": pair("muon", "weight_rms_growth"),
                   "layer_output_rms": pair("muon", "output_rms_growth"),
                   "vs_adamw": pair("adamw", "final"), "early": per_step[lead]}  # fmt: skip
    sign = lambda k: PAPER["claims"][k][1]
    end = lambda x, k: np.mean([r["checkpoints"][k][-1] for r in x.values()], 0).tolist()
    return {
        "adamw_rate": lr,
        "adamw_grid": {f"{x:g}": m for x, m in grid.items()},
        "curves": {c: {**{k: sweep.estimate(v.values()).to_json() for k, v in per[c].items()},
                       **{f"end_{k}": end(x, k) for k in POOL}} for c, x in rs.items() if x},
        "claims": {k: {"difference": e.to_json(), "verdict": sweep.verdict(e, sign(k))}
                   for k, e in differences.items()},
        "eval_step": steps,
        "vanilla_minus_wd": [e.to_json() for e in per_step],
        "early_lead_step": steps[lead],
        "crossing": {"by_seed": {str(s): c for s, c in crossings.items()},
                     "fraction": sweep.estimate(crossed).to_json() if crossed else None},
    }  # fmt: skip


# --- report ------------------------------------------------------------------------------


def _e(d: dict) -> sweep.Estimate:
    return sweep.Estimate(**{**d, "values": tuple(d["values"])})


def _pm(d: dict) -> str:
    spread = f" ± {d['half_width']:.4f}" if d["n"] > 1 else ""
    return f"{d['mean']:.4f}{spread} (n={d['n']})"


def markdown(results: dict) -> str:
    a, cells = results["analysis"], lambda xs: ", ".join(f"{v:.3f}" for v in xs)
    head = ("curve", "rate", "final eval loss", "log growth of weight RMS, 2nd half",
            "of largest layer-output RMS", "weight RMS per layer, end",
            "output RMS per layer, end")  # fmt: skip
    lines = [sweep.table_row(*head), sweep.table_row(*["---"] * 7)]
    for c, x in a["curves"].items():
        lr = a["adamw_rate"] if c == "adamw" else results["setup"]["muon_lr"]
        growths = (_pm(x["weight_rms_growth"]), _pm(x["output_rms_growth"]))
        ends = (cells(x["end_weight_rms"]), cells(x["end_output_rms"]))
        lines.append(sweep.table_row(CURVES[c][0], f"{lr:g}", _pm(x["final"]), *growths, *ends))
    lines += ["", sweep.table_row("claim (paper)", "ours", "paired difference (95%)", "verdict"),
              sweep.table_row(*["---"] * 4)]  # fmt: skip
    for k, claim in a["claims"].items():
        lines.append(sweep.table_row(PAPER["claims"][k][0], MEASURED[k], _e(claim["difference"]),
                                     claim["verdict"]))  # fmt: skip
    cross, grid = a["crossing"], a["adamw_grid"]
    fraction = f"; as a fraction of the run {_pm(cross['fraction'])}" if cross["fraction"] else ""
    return "\n".join([*lines, "",
        "AdamW's grid, seed means: "
        + ", ".join(f"{x}: {'diverged' if m is None else round(m, 4)}" for x, m in grid.items()),
        "Muon w/ wd ahead for good from step (per seed): "
        + ", ".join(f"{s}: {c or 'never'}" for s, c in cross["by_seed"].items())
        + f"{fraction} (paper: 0.31-0.87)"])  # fmt: skip


def plot(results: dict, path: pathlib.Path) -> None:
    a = results["analysis"]
    fig, ((loss_ax, diff_ax), (weight_ax, output_ax)) = sweep.figure(2, 2, (13, 9))
    late = []
    for c, (label, _) in CURVES.items():
        rs = list(by_seed(results["runs"], c, a["adamw_rate"] if c == "adamw" else None).values())
        for i, r in enumerate(rs):
            loss_ax.plot(*r["series"].values(), color=COLORS[c], lw=1, alpha=0.7,
                         label=label if i == 0 else None)  # fmt: skip
            late += r["series"]["eval_loss"][len(r["series"]["eval_loss"]) // 4 :]
        for ax, key in ((weight_ax, "weight_rms"), (output_ax, "output_rms")):
            layers = np.mean([r["checkpoints"][key] for r in rs], 0).T if rs else []
            for i, per_layer in enumerate(layers):
                ax.plot(rs[0]["checkpoints"]["step"], per_layer, ("-", "--", ":", "-.")[i % 4],
                        marker="o", ms=3, color=COLORS[c], label=f"{label}, layer {i}")  # fmt: skip
    loss_ax.set_ylim(min(late) - 0.02, max(late) + 0.02)
    sweep.error_bars(diff_ax, a["eval_step"], [_e(d) for d in a["vanilla_minus_wd"]], color="k",
                     ms=3, label="Muon w/o - w/ wd (mean ± 95% over seeds)")  # fmt: skip
    for key, sign in (("muon_wd_ahead", 1), ("vanilla_ahead", -1)):
        by = PAPER["inset"][key]["by"]
        sweep.paper_line(diff_ax, sign * by, f"paper: {key.replace('_', ' ')} by {by}")
    diff_ax.axhline(0, color="grey", lw=0.8)
    titles = {loss_ax: "eval loss (Figure 2), every seed",
              diff_ax: "eval-loss difference (Figure 2's inset; > 0: w/ wd ahead)",
              weight_ax: "weight RMS of the hidden matrices per layer, seed mean",
              output_ax: "layer-output RMS per layer (held-out windows), seed mean"}  # fmt: skip
    for ax, name in titles.items():
        ax.set(title=name, xlabel="step")
    z = results["setup"]
    sweep.save(fig, path, results, "Weight decay, Figure 2", f"{z['non_embedding_params']:,} "
               f"non-emb. params, {z['tokens']:.3g} tokens ({z['over_training']:.2g}x "
               "compute-optimal), WSD")  # fmt: skip


# --- main --------------------------------------------------------------------------------


def configs(args, setup: dict) -> dict:
    """Each curve's TrainConfig at its first rate, seed 0 (for --dry-run)."""
    from muonjax.train import TrainConfig

    first = {"adamw": setup["adamw"][0], "muon": setup["muon_lr"], "muon_wd": setup["muon_lr"]}
    return {c: TrainConfig(**fields_of(setup, c, first[c], 0, args.mesh)) for c in CURVES}


FINDING = sweep.Finding(NAME, __doc__, PAPER, scale_setup, configs, train, markdown, plot)
main = FINDING.main

if __name__ == "__main__":
    FINDING.command()
