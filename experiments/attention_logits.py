"""Attention logits: Appendix D (Figure 7) of "Muon is Scalable for LLM Training".

    python experiments/attention_logits.py                 # --scale cpu: 4 runs, ~13 min on 2 cores
    python experiments/attention_logits.py --quick         # toy sizes, end to end in under a minute
    python experiments/attention_logits.py --scale pod [--mesh data=8]   # build + inspect, no training

Four runs on the same data, tokens, learning rate, weight decay and schedule:
Muon (the Moonlight recipe) and AdamW, each with MLA (Moonlight's attention)
and with plain MHA. Every 5 steps the trainer logs, from the forward pass of
the step over its whole batch (the maximum over data-parallel devices and
micro-batches): the max attention logit per layer, max over heads and over the
valid (causal) logits q k^T / sqrt(d_qk), the quantity QK-Clip bounds; and
the paper's large attention logits ratio, the fraction of those logits above
a threshold (metrics.jsonl max_attention_logit_per_layer,
large_attention_logit_ratio[_per_layer]).

The paper (App. D) trains Moonlight (16B MoE, MLA) and Moonlight-A (AdamW) and
shows layer 1 over the first ~35k iterations: with Muon the max logit rises
above 100 in some layers early and then comes down; the fraction of logits
above 100 stays about 1e-4; AdamW keeps the max logit lower.

The CPU runs are a dense byte-level model of 4 layers (d_model 128, 4 heads;
MHA head dim 32; MLA with Moonlight's proportions scaled by 1/16: latent 32,
no-rope / rope / value head dims 32 / 16 / 32, so q k^T spans 48 dimensions
and is scaled by 1/sqrt(48); dense MLPs, since the logits
are the attention's and MoE layers would only slow the CPU down) trained for
400 steps of 16 x 128 tokens (0.8M tokens) on the Python standard library's
source, cosine schedule, weight decay 0.1, AdamW betas (0.9, 0.95). Learning
rate 1e-2 for both: AdamW's best in experiments/update_rms.py at this size and
the paper's protocol (Muon reuses AdamW's rate). It is a setting where logits
grow: probes of 150 steps put the layers' max logits at 30-170 under AdamW
(above 100 in two MHA layers) and at 9-21 under Muon; a higher rate would grow
them further but costs AdamW loss (3e-2 was its worst rate in update_rms). The
threshold is the paper's 100, since logits at this scale do cross it; --quick
uses a low one so that its counts are not all zero.

Writes results/attention_logits/results.json (curves per layer, peak and final
max logits, ratios, eval losses, configs, wall times, the paper's claims) and
attention_logits.png (the baseline figure for QK-Clip). --scale pod builds the
paper's Appendix D setting (Moonlight-16B-A3B with MLA, and an MHA variant;
2048 sequences of 8K per step, lr 4.2e-4) and reports parameters, FLOPs and
`inspect`'s per-device peak memory on --mesh (15-30 s per config here). On
data=8 every device holds all 16B parameters and their gradients in float32;
an expert axis (e.g. --mesh expert=8) splits the experts.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "attention_logits"

# run name -> (label, optimizer, attention)
RUNS = {
    "muon_mla": ("Muon, MLA", "muon", "mla"),
    "adamw_mla": ("AdamW, MLA", "adamw", "mla"),
    "muon_mha": ("Muon, MHA", "muon", "mha"),
    "adamw_mha": ("AdamW, MHA", "adamw", "mha"),
}
# --quick: the paper's pair (Moonlight / Moonlight-A, both MLA) on the CPU; on the pod, one
# config per optimizer and per attention
QUICK_RUNS = ("muon_mla", "adamw_mla")
QUICK_POD_RUNS = ("muon_mla", "adamw_mha")
COLORS = {"muon": "tab:blue", "adamw": "tab:red"}  # the paper's Moonlight / Moonlight-A
STYLES = {"mla": "-", "mha": "--"}

PAPER = {
    "setting": "Moonlight (16B total / 3B active MoE, MLA) with Muon vs Moonlight-A with AdamW, "
    "2048 x 8K-token batches, lr 4.2e-4; Figure 7 shows layer 1 over ~35k iterations",
    "threshold": 100.0,
    "claims": {
        "muon_max_logit": "the max attention logit (the single largest logit across the global "
        "batch) rises in specific layers during the initial training phase, exceeding 100",
        "muon_comes_down": "the maximum logit values gradually decrease as training progresses",
        "ratio": "the large attention logits ratio (the proportion of attention logits "
        "exceeding 100 within a batch) remains consistently low, about 1e-4",
        "adamw": "AdamW demonstrated healthier behavior in controlling this metric",
    },
    "ratio": 1e-4,
    "figure7_axes": {  # read off Figure 7 (c) and (d)
        "layer": 1,
        "iterations": 35000,
        "max_logit_axis_top": 120,
        "ratio_axis_top": 1.4e-4,
    },
}

TRAIN_KEYS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "max_attention_logit",
    "max_attention_logit_per_layer",
    "large_attention_logit_ratio",
    "large_attention_logit_ratio_per_layer",
)


# --- scale cpu: train -------------------------------------------------------------------


def cpu_base(quick: bool) -> dict:
    """The shared TrainConfig fields of the CPU runs; the model's MLA and MHA
    fields are both set, the runs choose `attention`."""
    if quick:
        model = dict(
            d_model=32, n_layers=2, first_k_dense=2, intermediate_size=88, n_heads=2,
            head_dim=16, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        )  # fmt: skip
        return dict(
            preset="tiny", model=model, steps=8, batch_size=8, seq_len=32,
            learning_rate=1e-2, weight_decay=0.1, schedule="cosine", warmup_steps=2,
            eval_every=4, eval_batches=1, log_every=2, large_logit_threshold=0.1,
        )  # fmt: skip
    model = dict(
        d_model=128, n_layers=4, first_k_dense=4, intermediate_size=352, n_heads=4,
        head_dim=32, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    )  # fmt: skip
    return dict(
        preset="tiny", model=model, steps=400, batch_size=16, seq_len=128,
        learning_rate=1e-2, weight_decay=0.1, schedule="cosine", warmup_steps=20,
        eval_every=20, eval_batches=4, log_every=5, large_logit_threshold=PAPER["threshold"],
    )  # fmt: skip


def run_config(base: dict, name: str, out: str):
    from muonjax.train import TrainConfig

    _, optimizer, attention = RUNS[name]
    fields = {**base, "model": {**base["model"], "attention": attention}}
    return TrainConfig(
        out=out,
        **fields,
        optimizer=optimizer,
        checkpoint_every=base["steps"],
        keep_checkpoints=1,
        progress=False,
        mesh=None,  # every device on data
    )


def summarize(train: dict, threshold: float) -> dict:
    """Peak and final max logit (which layer, when), whether it came down, and
    the large-logit ratio, from a run's logged curves."""
    per_layer = np.asarray(train["max_attention_logit_per_layer"])  # (logged steps, layers)
    ratio = np.asarray(train["large_attention_logit_ratio"])
    ratio_per_layer = np.asarray(train["large_attention_logit_ratio_per_layer"])
    step, layer = np.unravel_index(int(np.argmax(per_layer)), per_layer.shape)
    peak, final = float(per_layer[step, layer]), float(per_layer[-1].max())
    return {
        "max_logit_peak": peak,
        "max_logit_peak_step": train["step"][step],
        "max_logit_peak_layer": int(layer),
        "max_logit_peak_per_layer": per_layer.max(0).tolist(),
        "max_logit_final": final,
        "max_logit_final_per_layer": per_layer[-1].tolist(),
        "max_logit_final_over_peak": final / peak,
        "layers_above_threshold": [int(i) for i in np.flatnonzero(per_layer.max(0) > threshold)],
        "logged_steps_above_threshold": float(np.mean(per_layer.max(1) > threshold)),
        "ratio_peak": float(ratio.max()),
        "ratio_mean": float(ratio.mean()),
        "ratio_final": float(ratio[-1]),
        "ratio_peak_per_layer": ratio_per_layer.max(0).tolist(),  # the paper plots one layer's
    }


def train_one(config, log, keys=TRAIN_KEYS) -> dict:
    """Trains `config`; returns its curves (the metrics `keys`) and final numbers."""
    from muonjax.train import read_metrics, run

    started = time.perf_counter()
    summary = run(config, log=log)
    wall = time.perf_counter() - started
    saved = json.loads((pathlib.Path(config.out) / "config.json").read_text())
    metrics = read_metrics(config.out)
    evals = [r for r in metrics if "eval_loss" in r]
    logs = [r for r in metrics if "loss" in r]
    train = {
        "step": [r["step"] for r in logs],
        "tokens": [r["tokens"] for r in logs],
        **{key: [r[key] for r in logs] for key in keys},
    }
    return {
        "eval": {
            "step": [r["step"] for r in evals],
            "tokens": [r["step"] * config.batch_size * config.seq_len for r in evals],
            "eval_loss": [float(r["eval_loss"]) for r in evals],
        },
        "train": train,
        "final": {
            "eval_loss": float(summary.eval_loss),
            "train_loss": float(np.mean(train["loss"][-max(len(logs) // 10, 1) :])),
            **summarize(train, config.large_logit_threshold),
        },
        "summary": {**summary.to_json(), "out": None, "metrics_path": None},
        "wall_time_s": wall,
        "_parameters": saved["parameters"],
    }


def run_cpu(args) -> dict:
    import jax

    base = cpu_base(args.quick)
    results = {"scale": "cpu", "quick": args.quick, "base": base, "runs": {}, "configs": {}}
    started = time.perf_counter()
    parameters = {}
    with tempfile.TemporaryDirectory(prefix="attention_logits-") as tmp:
        for name in QUICK_RUNS if args.quick else RUNS:
            label, _, attention = RUNS[name]
            config = run_config(base, name, str(pathlib.Path(tmp) / name))
            print(f"{label}: training {config.steps} steps ...", flush=True)
            r = train_one(config, lambda *_: None)
            parameters[attention] = r.pop("_parameters")
            results["runs"][name] = {"label": label, **r}
            results["configs"][name] = {**config.to_json(), "out": None}
            f = r["final"]
            print(
                f"{label}: eval loss {f['eval_loss']:.4f}, max logit peak {f['max_logit_peak']:.1f} "
                f"(layer {f['max_logit_peak_layer']}, step {f['max_logit_peak_step']}), final "
                f"{f['max_logit_final']:.1f}, {r['wall_time_s']:.0f} s",
                flush=True,
            )
    results["setup"] = {
        "parameters": parameters,  # per attention kind
        "tokens": base["steps"] * base["batch_size"] * base["seq_len"],
        "threshold": base["large_logit_threshold"],
    }
    results["wall_time_s"] = time.perf_counter() - started
    results["devices"] = jax.device_count()
    return results


def claims(results: dict) -> list[tuple[str, str, str]]:
    """(claim, paper, ours) rows."""
    runs, threshold = results["runs"], results["setup"]["threshold"]
    final = {name: r["final"] for name, r in runs.items()}

    def peak(name):
        f = final[name]
        return (
            f"{f['max_logit_peak']:.3g} (layer {f['max_logit_peak_layer']}, step "
            f"{f['max_logit_peak_step']})"
        )

    def each(kinds, text):
        return "; ".join(f"{runs[n]['label']}: {text(n)}" for n in kinds)

    # in RUNS's order; --quick has some of them
    muon, adamw = ([n for n in RUNS if n in runs and RUNS[n][1] == o] for o in ("muon", "adamw"))
    above = lambda n: final[n]["layers_above_threshold"] or "none"
    return [
        (
            f"Muon: max logit rises above {threshold:g} early, in some layers",
            "above 100 in specific layers, early in training",
            each(muon, lambda n: f"peak {peak(n)}, layers above {threshold:g}: {above(n)}"),
        ),
        (
            "Muon: max logit comes down later",
            "gradually decreases",
            each(
                muon,
                lambda n: (
                    f"final {final[n]['max_logit_final']:.3g} = "
                    f"{final[n]['max_logit_final_over_peak']:.2f} x peak"
                ),
            ),
        ),
        (
            f"large logits ratio (> {threshold:g})",
            "about 1e-4 (Muon)",
            each(
                (*muon, *adamw),
                lambda n: (
                    f"peak {final[n]['ratio_peak']:.2g} (worst layer "
                    f"{max(final[n]['ratio_peak_per_layer']):.2g}), mean {final[n]['ratio_mean']:.2g}"
                ),
            ),
        ),
        (
            "AdamW controls the max logit better",
            "yes (Moonlight-A below Moonlight)",
            each(
                adamw,
                lambda n: (
                    f"peak {peak(n)}, final {final[n]['max_logit_final']:.3g} "
                    f"(Muon: peak {final[n.replace('adamw', 'muon')]['max_logit_peak']:.3g}, "
                    f"final {final[n.replace('adamw', 'muon')]['max_logit_final']:.3g})"
                ),
            ),
        ),
    ]


def markdown(results: dict) -> str:
    threshold = results["setup"]["threshold"]
    lines = [
        f"| run | final eval loss | max logit peak (layer, step) | final max logit per layer "
        f"| final / peak | ratio > {threshold:g}: peak / mean / final | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"].values():
        f = r["final"]
        per_layer = ", ".join(f"{x:.3g}" for x in f["max_logit_final_per_layer"])
        lines.append(
            f"| {r['label']} | {f['eval_loss']:.4f} | {f['max_logit_peak']:.3g} "
            f"({f['max_logit_peak_layer']}, {f['max_logit_peak_step']}) | {per_layer} "
            f"| {f['max_logit_final_over_peak']:.2f} | {f['ratio_peak']:.2g} / "
            f"{f['ratio_mean']:.2g} / {f['ratio_final']:.2g} "
            f"| {r['summary']['tokens_per_s'] or 0:.0f} |"
        )
    lines += ["", "| claim | paper (Moonlight, App. D) | ours |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in claims(results)]
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path, title: str) -> None:
    """Top: the max logit of each layer over training, one panel per run, on a
    shared y axis (the threshold dotted where it is in range). Bottom: the
    large-logit ratio and the eval loss of every run, and each layer's peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, threshold = results["runs"], results["setup"]["threshold"]
    fig = plt.figure(figsize=(17, 8.5))
    grid = fig.add_gridspec(2, 12)
    millions = lambda xs: np.asarray(xs) / 1e6
    top = max(r["final"]["max_logit_peak"] for r in runs.values())
    show_threshold = threshold <= 1.2 * top
    for i, r in enumerate(runs.values()):
        ax = fig.add_subplot(grid[0, 3 * i : 3 * i + 3])
        t = millions(r["train"]["tokens"])
        per_layer = np.asarray(r["train"]["max_attention_logit_per_layer"])
        colors = plt.cm.viridis(np.linspace(0, 0.9, per_layer.shape[1]))
        for layer, color in enumerate(colors):
            ax.plot(t, per_layer[:, layer], color=color, label=f"layer {layer}")
        if show_threshold:
            ax.axhline(threshold, color="grey", ls=":", lw=1, label=f"threshold {threshold:g}")
        ax.set_ylim(0, 1.05 * max(top, threshold if show_threshold else 0))
        ax.set_title(f"{r['label']}: max attention logit", fontsize=10)
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.set_ylabel("max logit per layer (global batch)")
            ax.legend(fontsize=8)
    ratio_ax, loss_ax, bars = (fig.add_subplot(grid[1, 4 * i : 4 * i + 4]) for i in range(3))
    width = 0.8 / len(runs)
    for i, (name, r) in enumerate(runs.items()):
        _, optimizer, attention = RUNS[name]
        style = dict(color=COLORS[optimizer], ls=STYLES[attention], label=r["label"])
        ratio_ax.plot(millions(r["train"]["tokens"]), r["train"]["large_attention_logit_ratio"],
                      **style)  # fmt: skip
        loss_ax.plot(millions(r["eval"]["tokens"]), r["eval"]["eval_loss"], **style)
        peaks = r["final"]["max_logit_peak_per_layer"]
        bars.bar(np.arange(len(peaks)) + i * width, peaks, width, color=COLORS[optimizer],
                 hatch="//" if attention == "mha" else None, edgecolor="white",
                 label=r["label"])  # fmt: skip
    ratio_ax.set_yscale("symlog", linthresh=1e-5)
    ratio_ax.axhline(PAPER["ratio"], color="grey", ls=":", lw=1, label="paper: about 1e-4")
    ratio_ax.set_title(f"large attention logits ratio (> {threshold:g}), all layers", fontsize=10)
    loss_ax.set_title("validation loss", fontsize=10)
    loss_ax.set_ylabel("eval loss")
    for ax in (ratio_ax, loss_ax):
        ax.set_xlabel("training tokens (M)")
    bars.set_xticks(np.arange(len(peaks)) + 0.4 - width / 2, [str(i) for i in range(len(peaks))])
    bars.set_xlabel("layer")
    bars.set_title("peak max logit per layer over the run", fontsize=10)
    for ax in (ratio_ax, loss_ax, bars):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- scale pod: build and inspect -------------------------------------------------------

# Moonlight-16B-A3B (the preset: 27 layers, first dense, 64 routed + 2 shared
# experts, MLA) and the same model with MHA of 16 heads of 128.
POD_ATTENTION = {"mla": {}, "mha": dict(attention="mha", head_dim=128)}
# --quick: the "tiny" preset, one dense layer (an MoE's compile would dominate the test's time)
POD_QUICK_ATTENTION = {
    "mla": dict(n_layers=1, first_k_dense=1),
    "mha": dict(n_layers=1, first_k_dense=1, attention="mha", head_dim=16),
}
_PAPER_BATCH, _PAPER_SEQ = 2048, 8192  # Sec. 3.3 stage 1: 2048 examples, 8K context


def pod_setup(quick: bool, data_parallel: int) -> dict:
    """The paper's Moonlight pretraining as far as Figure 7 shows it: 35k
    steps of 2048 x 8K tokens (stage 1's batch; the doubling to 4096 at 200B
    tokens is not modeled), lr warmed up to 4.2e-4 in 2k steps, then cosine to
    4.2e-5 over stage 2's horizon (5.2T tokens), weight decay 0.1; one
    sequence per data-parallel rank per micro-batch."""
    if quick:
        preset, seq_len, batch, steps = "tiny", 64, data_parallel, 20
        horizon, warmup = steps, 2
    else:
        preset, seq_len, batch, steps = "moonlight-16b-a3b", _PAPER_SEQ, _PAPER_BATCH, 35000
        horizon, warmup = round(5.2e12 / (_PAPER_BATCH * _PAPER_SEQ)), 2000
    if batch % data_parallel:
        raise SystemExit(
            f"--mesh: the data-parallel size {data_parallel} (data x expert) does not divide "
            f"the paper's batch of {batch} sequences"
        )
    return dict(
        preset=preset, seq_len=seq_len, batch_size=batch, grad_accum=batch // data_parallel,
        learning_rate=4.2e-4, min_lr_ratio=0.1, weight_decay=0.1, schedule="cosine",
        steps=steps, decay_steps=horizon, warmup_steps=warmup,
        large_logit_threshold=PAPER["threshold"],
    )  # fmt: skip


def run_pod(args) -> dict:
    from muonjax.models import flops_per_token, param_counts
    from muonjax.parallel.mesh import make_mesh, parse_mesh
    from muonjax.train import TrainConfig
    from muonjax.train.costs import step_costs

    sizes = parse_mesh(args.mesh)
    mesh = make_mesh(sizes)
    setup = pod_setup(args.quick, sizes["data"] * sizes["expert"])
    attention = POD_QUICK_ATTENTION if args.quick else POD_ATTENTION
    started = time.perf_counter()
    report = {}
    for name in QUICK_POD_RUNS if args.quick else RUNS:
        label, optimizer, kind = RUNS[name]
        config = TrainConfig(
            out=f"runs/{NAME}/{name}",
            **setup,
            model=attention[kind],
            optimizer=optimizer,
            mesh=args.mesh,
        )
        model = config.model_config()
        t = time.perf_counter()
        inspected = {**step_costs(config, mesh), "inspect_s": time.perf_counter() - t}
        print(f"{label}: inspected in {inspected['inspect_s']:.0f} s", flush=True)
        per_token = flops_per_token(model, config.seq_len)
        tokens = config.steps * config.batch_size * config.seq_len
        counts = param_counts(model)
        report[name] = {
            "label": label,
            "config": config.to_json(),
            "model": dict(model.__dict__),
            "parameters": counts,
            "flops_per_token": per_token,
            "six_n_active_non_embedding": 6 * counts["active_non_embedding"],
            "tokens": tokens,
            "run_flops": float(per_token) * tokens,
            "inspect": inspected,
            "peak_bytes_per_device": inspected["peak_bytes"],
        }
    return {
        "mesh": args.mesh,
        "setup": setup,
        "runs": report,
        "wall_time_s": time.perf_counter() - started,
    }


def pod_markdown(pod: dict) -> str:
    lines = [
        "| run | params (total / active) | FLOPs/token (6N active non-emb.) | steps x batch x seq "
        "| tokens | run FLOPs | peak GiB/device |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in pod["runs"].values():
        p, c = r["parameters"], r["config"]
        lines.append(
            f"| {r['label']} | {p['total'] / 1e9:.3g}B / {p['active'] / 1e9:.3g}B "
            f"| {r['flops_per_token']:.3g} ({r['six_n_active_non_embedding']:.3g}) "
            f"| {c['steps']} x {c['batch_size']} x {c['seq_len']} (grad_accum {c['grad_accum']}) "
            f"| {r['tokens']:.3g} | {r['run_flops']:.3g} "
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
    s = results["setup"]
    print()
    print(markdown(results))
    print(f"\nwall time {results['wall_time_s']:.0f} s in all")
    path = common.write_results(out, results)
    mla = s["parameters"]["mla"]["total_non_embedding"]
    plot(results, out / f"{NAME}.png",
         f"Attention logits, Appendix D ({'quick' if args.quick else 'cpu'}): "
         f"{mla / 1e3:.0f}k non-emb. params (MLA), {s['tokens'] / 1e6:.2f}M tokens, "
         f"lr {results['base']['learning_rate']:g}")  # fmt: skip
    print(f"wrote {path} and {out / f'{NAME}.png'}")
    return 0


if __name__ == "__main__":
    common.start_jax()
    sys.exit(main())
