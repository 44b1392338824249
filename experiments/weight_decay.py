"""Weight decay: Figure 2 of "Muon is Scalable for LLM Training" (Sec. 2.2).

    python experiments/weight_decay.py                 # --scale cpu: 3 runs, ~10-13 min on 2 cores
    python experiments/weight_decay.py --quick         # toy sizes, end to end in seconds
    python experiments/weight_decay.py --scale pod [--mesh data=8]   # build + inspect, no training

Three runs on the same data, tokens, learning rate and schedule (cosine):
  AdamW          (wd 0.1)  W -= lr (m / sqrt(v) + 0.1 W)
  Muon w/o wd    (wd 0)    W -= lr  0.2 sqrt(max(A, B)) O          (vanilla Muon)
  Muon w/ wd     (wd 0.1)  W -= lr (0.2 sqrt(max(A, B)) O + 0.1 W) (Eq. 3, the Moonlight recipe)
Both Muon runs are the Moonlight recipe (AdamW for embeddings, head, norms);
the vanilla run removes the decay from Muon's matrices only: its AdamW group
keeps wd 0.1 (--weight-decay-adamw), so the runs differ in Eq. 3's lambda alone.

The paper trains an 800M model on 100B tokens (about 5x compute-optimal) and
shows validation loss over the run: vanilla Muon ahead early, Muon with decay
ahead later and below AdamW; without decay the weight and layer-output RMS keep
growing. The CPU runs are over-trained the same way: a dense byte-level model
of ~57k non-embedding parameters trained on ~5.7M tokens (~100 tokens per
parameter, ~5x the 20 tokens/param compute-optimal rule; half an epoch of the
default corpus, the Python standard library's source, so no text repeats).
Logged: eval loss every 20 steps (35 points), the RMS of the Muon-group hidden
matrices every 10 steps (metrics.jsonl weight_rms_muon; the same matrices in
the AdamW run), and the RMS of each layer's output (the residual stream after
each block) on a validation batch, from the checkpoints at every tenth of the run.

Writes results/weight_decay/results.json (curves, final numbers, configs, wall
times, the paper's claims) and weight_decay.png, and prints the comparison.
--scale pod builds the paper's configs (Table 2's 822M row, dense) and reports
parameters, FLOPs and `inspect`'s per-device peak memory on --mesh.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "weight_decay"

# run name -> (label, TrainConfig fields)
RUNS = {
    "adamw": ("AdamW", dict(optimizer="adamw", weight_decay=0.1)),
    "muon": (
        "Muon w/o weight decay",
        dict(optimizer="muon", weight_decay=0.0, weight_decay_adamw=0.1),
    ),
    "muon_wd": ("Muon w/ weight decay", dict(optimizer="muon", weight_decay=0.1)),
}
COLORS = {"adamw": "tab:green", "muon": "tab:red", "muon_wd": "tab:blue"}

_PAPER_TOKENS_PER_STEP = 160 * 8192  # Table 2: 160 sequences of 8K per step (822M row)
PAPER = {
    "setting": "800M parameters (Table 2's 822M row), 100B tokens (~5x compute-optimal), "
    "validation loss vs training iterations (Figure 2)",
    "claims": {
        "weight_rms_without_wd": "keeps growing (Sec. 2.2: 'both the weight and the layer "
        "output's RMS keep growing to a large scale, exceeding the high-precision range of bf16')",
        "layer_output_rms_without_wd": "keeps growing",
        "early": "vanilla Muon initially converges faster than Muon with weight decay",
        "late": "Muon with weight decay outperforms vanilla Muon in the over-train regime",
        "vs_adamw": "Muon with weight decay outperforms AdamW (lower validation loss)",
    },
    # Figure 2's inset: validation loss of vanilla Muon - Muon with weight decay
    "inset": {
        "vanilla_wins": {"by": 0.023, "iteration": 24000, "tokens": 24000 * _PAPER_TOKENS_PER_STEP},
        "muon_wd_wins": {"by": 0.017, "iteration": 66000, "tokens": 66000 * _PAPER_TOKENS_PER_STEP},
    },
    "validation_loss_range": [2.25, 2.55],  # the figure's y axis, late in training
}


# --- scale cpu: train -------------------------------------------------------------------


def cpu_base(quick: bool) -> dict:
    """The shared TrainConfig fields of the CPU runs: a dense model (every layer
    dense, SwiGLU width 2.75 d_model like Table 2's models, full MHA),
    byte-level on the Python standard library's source."""
    if quick:
        model = dict(
            d_model=32, n_layers=2, first_k_dense=2, intermediate_size=88,
            n_heads=2, attention="mha", head_dim=16,
        )  # fmt: skip
        return dict(
            preset="tiny", model=model, steps=16, batch_size=8, seq_len=32,
            learning_rate=1e-2, schedule="cosine", warmup_steps=2,
            eval_every=2, eval_batches=1, log_every=2, checkpoint_every=8,
        )  # fmt: skip
    # ~57k non-embedding parameters; 700 steps x 64 x 128 = 5.7M tokens (~5x
    # compute-optimal). Sized by throughput: on 2 cores a model this small runs
    # at 20-30k tokens/s whatever its width (per-step overhead dominates), so
    # tokens, not parameters, set the time: ~4-5 min per run.
    model = dict(
        d_model=48, n_layers=2, first_k_dense=2, intermediate_size=132,
        n_heads=4, attention="mha", head_dim=12,
    )  # fmt: skip
    return dict(
        preset="tiny", model=model, steps=700, batch_size=64, seq_len=128,
        learning_rate=1e-2, schedule="cosine", warmup_steps=20,
        eval_every=20, eval_batches=4, log_every=10, checkpoint_every=70,
    )  # fmt: skip


@functools.lru_cache
def layer_output_rms_fn(model_config):
    """f(params, tokens_BL) -> (n_layers,) RMS of the residual stream after each
    block (a layer's output) on the batch; params: a checkpoint's nested dict.
    Dense models only (MoE layers would also need the router biases)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from muonjax.models import Transformer
    from muonjax.models.transformer import LAYERS

    if model_config.n_moe_layers:
        raise ValueError("layer_output_rms_fn: dense models only (first_k_dense = n_layers)")
    graphdef, state = nnx.split(Transformer(model_config, rngs=nnx.Rngs(0)), nnx.Param)

    @nnx.scan(
        in_axes=(0, nnx.Carry, None),
        out_axes=(nnx.Carry, 0),
        transform_metadata={nnx.PARTITION_NAME: LAYERS},
    )
    def blocks(block, x_BLD, positions_BL):
        y_BLD, _ = block(x_BLD, positions_BL)
        return y_BLD, jnp.sqrt(jnp.mean(jnp.square(y_BLD.astype(jnp.float32))))

    @jax.jit
    def rms(params_state, tokens_BL):
        model = nnx.merge(graphdef, params_state)
        B, L = tokens_BL.shape
        positions_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
        _, rms_N = blocks(
            model.dense_layers, model.embed(tokens_BL).astype(model_config.dtype), positions_BL
        )
        return rms_N

    def f(params, tokens_BL):
        nnx.replace_by_pure_dict(state, common.strip_values(params))
        return [float(x) for x in rms(state, jnp.asarray(tokens_BL, jnp.int32))]

    return f


def validation_batch(config) -> np.ndarray:
    """The first evaluation batch's inputs (B, L), as the trainer evaluates on."""
    from muonjax.train.data import load_data
    from muonjax.train.pipeline import TokenWindows, eval_batches

    data = load_data(config, pathlib.Path(config.out))
    windows = TokenWindows(data.validation_tokens, config.seq_len)
    return eval_batches(windows, config.batch_size, 1, spread=False)[0][:, :-1]


def train_one(config, tokens_BL, log) -> dict:
    """Trains `config`; returns its curves and final numbers."""
    from muonjax.train import read_metrics, run

    started = time.perf_counter()
    summary = run(config, log=log)
    wall = time.perf_counter() - started
    per_step = config.batch_size * config.seq_len
    metrics = read_metrics(config.out)
    evals = [r for r in metrics if "eval_loss" in r]
    logs = [r for r in metrics if "loss" in r]
    saved = json.loads((pathlib.Path(config.out) / "config.json").read_text())
    model_config = config.model_config(vocab_size=saved["model"]["vocab_size"])
    if tokens_BL is None:
        tokens_BL = validation_batch(config)
    layer_rms = layer_output_rms_fn(model_config)
    checkpoints = common.checkpoint_steps(config.out)
    per_layer = [layer_rms(common.params_at(config.out, s), tokens_BL) for s in checkpoints]
    return {
        "eval": {
            "step": [r["step"] for r in evals],
            "tokens": [r["step"] * per_step for r in evals],
            "eval_loss": [float(r["eval_loss"]) for r in evals],
        },
        "train": {
            "step": [r["step"] for r in logs],
            "tokens": [r["tokens"] for r in logs],
            **{
                key: [float(r[key]) for r in logs]
                for key in (
                    "loss",
                    "learning_rate",
                    "weight_rms_muon",
                    "weight_rms_adamw",
                    "update_rms_muon",
                    "update_rms_adamw",
                )
                if key in logs[0]
            },  # fmt: skip
        },
        "layer_output_rms": {
            "step": checkpoints,
            "tokens": [s * per_step for s in checkpoints],
            "per_layer": per_layer,
            "max": [max(x) for x in per_layer],
        },
        "final": {
            "eval_loss": float(summary.eval_loss),
            "train_loss": float(np.mean([r["loss"] for r in logs[-max(len(logs) // 10, 1) :]])),
            "weight_rms_muon": float(logs[-1]["weight_rms_muon"]),
            "weight_rms_adamw": float(logs[-1]["weight_rms_adamw"]),
            "layer_output_rms_max": max(per_layer[-1]),
        },
        "summary": {**summary.to_json(), "out": None, "metrics_path": None},
        "wall_time_s": wall,
        "_vocab_size": saved["model"]["vocab_size"],
        "_parameters": saved["parameters"],
        "_train_tokens": saved["data"]["train_tokens"],
        "_tokens_BL": tokens_BL,
    }


def run_cpu(args) -> dict:
    import jax

    from muonjax.train import TrainConfig

    base = cpu_base(args.quick)
    results = {"scale": "cpu", "quick": args.quick, "base": base, "runs": {}, "configs": {}}
    started = time.perf_counter()
    quiet = lambda *_: None
    tokens_BL = None
    with tempfile.TemporaryDirectory(prefix="weight_decay-") as tmp:
        for name, (label, fields) in RUNS.items():
            config = TrainConfig(
                out=str(pathlib.Path(tmp) / name),
                **base,
                **fields,
                keep_checkpoints=base["steps"] // base["checkpoint_every"] + 1,
                progress=False,
                mesh=None,  # every device on data
            )
            print(f"{label}: training {config.steps} steps ...", flush=True)
            r = train_one(config, tokens_BL, quiet)
            tokens_BL = r.pop("_tokens_BL")
            info = {k[1:]: r.pop(k) for k in ("_vocab_size", "_parameters", "_train_tokens")}
            results["runs"][name] = {"label": label, **r}
            results["configs"][name] = {**config.to_json(), "out": None}
            print(
                f"{label}: eval loss {r['final']['eval_loss']:.4f}, weight RMS "
                f"{r['final']['weight_rms_muon']:.4f}, {r['wall_time_s']:.0f} s "
                f"({r['summary']['tokens_per_s'] or 0:.0f} tokens/s)",
                flush=True,
            )
    non_embedding = info["parameters"]["total_non_embedding"]
    tokens = base["steps"] * base["batch_size"] * base["seq_len"]
    results["setup"] = {
        "parameters": info["parameters"],
        "vocab_size": info["vocab_size"],
        "tokens": tokens,
        "tokens_per_non_embedding_parameter": tokens / non_embedding,
        # Chinchilla's ~20 tokens per parameter (the paper's Sec. 3.2 fits its own)
        "compute_optimal_tokens": 20 * non_embedding,
        "over_training_factor": tokens / (20 * non_embedding),
        "epochs": tokens / info["train_tokens"],
        "train_tokens_in_corpus": info["train_tokens"],
        "validation_batch_for_layer_rms": list(tokens_BL.shape),
    }
    results["comparison"] = compare(results["runs"])
    results["wall_time_s"] = time.perf_counter() - started
    results["devices"] = jax.device_count()
    return results


def compare(runs: dict) -> dict:
    """Where vanilla Muon is ahead of / behind Muon with decay (Figure 2's inset:
    difference = vanilla - with decay, negative = vanilla ahead), and Muon with
    decay against AdamW."""
    tokens = runs["muon_wd"]["eval"]["tokens"]
    assert runs["muon"]["eval"]["tokens"] == tokens == runs["adamw"]["eval"]["tokens"]
    wd = np.asarray(runs["muon_wd"]["eval"]["eval_loss"])
    diff = np.asarray(runs["muon"]["eval"]["eval_loss"]) - wd
    vs_adamw = np.asarray(runs["adamw"]["eval"]["eval_loss"]) - wd  # positive: Muon w/ wd ahead

    def stays_positive_from(d):
        """Tokens from which d > 0 at every later evaluation (None if it ends <= 0)."""
        if d[-1] <= 0:
            return None
        i = len(d) - 1
        while i > 0 and d[i - 1] > 0:
            i -= 1
        return tokens[i]

    lo, hi = int(np.argmin(diff)), int(np.argmax(diff))
    behind = [t for t, d in zip(tokens, diff) if d < 0]
    return {
        "tokens": tokens,
        "vanilla_minus_wd": diff.tolist(),
        "adamw_minus_muon_wd": vs_adamw.tolist(),
        "vanilla_wins": {"by": float(-diff[lo]), "tokens": tokens[lo]} if diff[lo] < 0 else None,
        "muon_wd_wins": {"by": float(diff[hi]), "tokens": tokens[hi]} if diff[hi] > 0 else None,
        "vanilla_ahead_fraction_of_evals": float(np.mean(diff < 0)),
        "vanilla_last_ahead_tokens": behind[-1] if behind else None,
        # the token count where Muon w/ wd overtakes vanilla Muon for good
        "muon_wd_ahead_for_good_from_tokens": stays_positive_from(diff),
        "muon_wd_ahead_of_adamw_for_good_from_tokens": stays_positive_from(vs_adamw),
        "final_vanilla_minus_wd": float(diff[-1]),
        "final_adamw_minus_muon_wd": float(vs_adamw[-1]),
    }


def _growth(values, tokens) -> float:
    """values at the end / values at half the run (> 1: still growing)."""
    half = int(np.searchsorted(tokens, tokens[-1] / 2))
    return float(values[-1] / values[min(half, len(values) - 1)])


def claims(results: dict) -> list[tuple[str, str, str]]:
    """(claim, paper, ours) rows."""
    runs, c = results["runs"], results["comparison"]
    claims_paper = PAPER["claims"]
    inset = PAPER["inset"]

    def weight(name):
        t = runs[name]["train"]
        return t["weight_rms_muon"], t["tokens"]

    def layer(name):
        t = runs[name]["layer_output_rms"]
        return t["max"], t["tokens"]

    def mt(tokens):
        return f"{tokens / 1e6:.3g}M tokens"

    rows = []
    for key, get, what in (
        ("weight_rms_without_wd", weight, "weight RMS"),
        ("layer_output_rms_without_wd", layer, "max layer-output RMS"),
    ):
        v, t = get("muon")
        w, tw = get("muon_wd")
        rows.append((
            f"w/o wd, {what}",
            claims_paper[key].split(" (")[0],
            f"{v[0]:.3g} -> {v[-1]:.3g} (x{_growth(v, t):.2f} over the second half); "
            f"w/ wd {w[-1]:.3g} (x{_growth(w, tw):.2f}); AdamW {get('adamw')[0][-1]:.3g}",
        ))  # fmt: skip
    vw, ww = c["vanilla_wins"], c["muon_wd_wins"]
    rows.append((
        "early: vanilla Muon ahead",
        f"by {inset['vanilla_wins']['by']} at iteration {inset['vanilla_wins']['iteration']}",
        (f"by {vw['by']:.3g} at {mt(vw['tokens'])}; ahead at "
         f"{c['vanilla_ahead_fraction_of_evals']:.0%} of evaluations, last at "
         f"{mt(c['vanilla_last_ahead_tokens'])}") if vw else "never",
    ))  # fmt: skip
    rows.append((
        "late: Muon w/ wd ahead",
        f"by {inset['muon_wd_wins']['by']} at iteration {inset['muon_wd_wins']['iteration']}",
        (f"by {ww['by']:.3g} at {mt(ww['tokens'])}; ahead for good from "
         + (mt(c["muon_wd_ahead_for_good_from_tokens"])
            if c["muon_wd_ahead_for_good_from_tokens"] is not None else "- (not at the end)")
         + f"; final difference {c['final_vanilla_minus_wd']:+.4f}") if ww else "never",
    ))  # fmt: skip
    good = c["muon_wd_ahead_of_adamw_for_good_from_tokens"]
    rows.append((
        "Muon w/ wd beats AdamW",
        "yes, lower validation loss",
        f"final AdamW - Muon w/ wd {c['final_adamw_minus_muon_wd']:+.4f}"
        + (f"; ahead for good from {mt(good)}" if good is not None else ""),
    ))  # fmt: skip
    return rows


def markdown(results: dict) -> str:
    runs = results["runs"]
    lines = [
        "| run | final eval loss | best eval loss | final train loss | weight RMS (Muon-group "
        "matrices) | max layer-output RMS | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs.values():
        f = r["final"]
        lines.append(
            f"| {r['label']} | {f['eval_loss']:.4f} | {min(r['eval']['eval_loss']):.4f} "
            f"| {f['train_loss']:.4f} | {f['weight_rms_muon']:.4g} | {f['layer_output_rms_max']:.4g} "
            f"| {r['summary']['tokens_per_s'] or 0:.0f} |"
        )
    lines += ["", "| claim | paper (800M, 100B tokens) | ours |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in claims(results)]
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, c = results["runs"], results["comparison"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (loss_ax, diff_ax), (weight_ax, layer_ax) = axes
    millions = lambda xs: np.asarray(xs) / 1e6
    late = []
    for name, r in runs.items():
        t, v = millions(r["eval"]["tokens"]), np.asarray(r["eval"]["eval_loss"])
        loss_ax.plot(t, v, color=COLORS[name], label=r["label"])
        late.extend(v[len(v) // 5 :])
        weight_ax.plot(millions(r["train"]["tokens"]), r["train"]["weight_rms_muon"],
                       color=COLORS[name], label=r["label"])  # fmt: skip
        lr = r["layer_output_rms"]
        layer_ax.plot(millions(lr["tokens"]), lr["max"], "o-", color=COLORS[name], label=r["label"])
    if late:  # the paper's view: the later part of the run
        low, high = min(late), max(late)
        loss_ax.set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.05 * (high - low + 1e-3))
    loss_ax.set_title("validation loss (Figure 2)")
    loss_ax.set_ylabel("eval loss")
    loss_ax.legend()
    t = millions(c["tokens"])
    diff_ax.plot(t, c["vanilla_minus_wd"], color="k", label="vanilla Muon - Muon w/ wd")
    diff_ax.plot(
        t, c["adamw_minus_muon_wd"], color="tab:green", ls="--", label="AdamW - Muon w/ wd"
    )
    diff_ax.axhline(0, color="grey", lw=0.8)
    for key, where in (("vanilla_wins", "vanilla wins"), ("muon_wd_wins", "Muon w/ wd wins")):
        w = c[key]
        if w:
            sign = -1 if key == "vanilla_wins" else 1
            diff_ax.annotate(f"{where} {w['by']:.3f}\nat {w['tokens'] / 1e6:.2f}M tokens",
                             (w["tokens"] / 1e6, sign * w["by"]), fontsize=8,
                             textcoords="offset points", xytext=(5, 5 * sign))  # fmt: skip
    diff_ax.set_title("difference in eval loss (Figure 2's inset; > 0: Muon w/ wd ahead)")
    diff_ax.legend(fontsize=8)
    weight_ax.set_title("weight RMS, Muon-group hidden matrices")
    weight_ax.set_ylabel("RMS")
    layer_ax.set_title("layer-output RMS (max over layers, a validation batch)")
    for ax in axes.flat:
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
    weight_ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- scale pod: build and inspect -------------------------------------------------------

# Table 2's 822M row: 16 layers, hidden 2048, 16 heads; dense SwiGLU of width
# 2.75 x 2048 = 5632, which with full MHA (head dim 128) gives 822M non-embedding
# parameters. The moonlight-16b-a3b preset gives the vocabulary (Moonlight's
# tokenizer, 163840: the paper does not state its scaling-law models'),
# bfloat16 activations and remat.
POD_MODEL = dict(
    d_model=2048, n_layers=16, first_k_dense=16, intermediate_size=5632,
    n_heads=16, attention="mha", head_dim=128,
)  # fmt: skip
# Vanilla Muon's step is Muon w/ wd's program with a decay of 0 (same buffers,
# FLOPs to one multiply-add per parameter): inspected once.
INSPECT_AS = {"muon": "muon_wd"}
POD_QUICK_MODEL = dict(
    d_model=64, n_layers=1, first_k_dense=1, intermediate_size=176,
    n_heads=4, attention="mha", head_dim=16,
)  # fmt: skip


def pod_setup(quick: bool, data_parallel: int) -> dict:
    """The paper's runs: 100B tokens at 160 x 8K sequences per step (Table 2's
    822M batch), lr 8.825e-4 (Table 2), cosine; one sequence per data-parallel
    rank per micro-batch (grad_accum = 160 / data-parallel size)."""
    if quick:
        preset, model, seq_len, batch, tokens = "tiny", POD_QUICK_MODEL, 64, 2 * data_parallel, None
    else:
        preset, model, seq_len, batch, tokens = "moonlight-16b-a3b", POD_MODEL, 8192, 160, 100e9
    if batch % data_parallel:
        raise SystemExit(
            f"--mesh: the data-parallel size {data_parallel} (data x expert) does not divide "
            f"the paper's batch of {batch} sequences"
        )
    steps = 20 if quick else round(tokens / (batch * seq_len))
    return dict(
        preset=preset, model=model, seq_len=seq_len, batch_size=batch,
        grad_accum=batch // data_parallel, learning_rate=8.825e-4, schedule="cosine",
        steps=steps, warmup_steps=2 if quick else 1000,  # warmup: not stated by the paper; ours
    )  # fmt: skip


def run_pod(args) -> dict:
    from muonjax.models import flops_per_token, param_counts
    from muonjax.parallel.mesh import make_mesh, parse_mesh
    from muonjax.train import TrainConfig
    from muonjax.train.costs import step_costs

    sizes = parse_mesh(args.mesh)
    mesh = make_mesh(sizes)
    setup = pod_setup(args.quick, sizes["data"] * sizes["expert"])
    started = time.perf_counter()
    configs = {
        name: TrainConfig(out=f"runs/{NAME}/{name}", **setup, **fields, mesh=args.mesh)
        for name, (_, fields) in RUNS.items()
    }
    report, cache = {}, {}
    for name, config in configs.items():
        label, model = RUNS[name][0], config.model_config()
        key = INSPECT_AS.get(name, name)
        if key not in cache:
            t = time.perf_counter()
            cache[key] = {**step_costs(configs[key], mesh), "inspect_s": time.perf_counter() - t}
            print(f"{RUNS[key][0]}: inspected in {cache[key]['inspect_s']:.0f} s", flush=True)
        inspected = {**cache[key], "inspected_setting": key}
        per_token = flops_per_token(model, config.seq_len)
        tokens = config.steps * config.batch_size * config.seq_len
        counts = param_counts(model)
        report[name] = {
            "label": label,
            "config": config.to_json(),
            "model": dict(model.__dict__),
            "parameters": counts,
            "flops_per_token": per_token,
            "six_n_non_embedding": 6 * counts["active_non_embedding"],
            "tokens": tokens,
            "over_training_factor": tokens / (20 * counts["total_non_embedding"]),
            "run_flops": float(per_token) * tokens,
            "inspect": inspected,
            "peak_bytes_per_device": inspected["peak_bytes"],
        }
    return {
        "mesh": args.mesh,
        "vocab_size": report["muon_wd"]["model"]["vocab_size"],
        "vocab_assumption": "Moonlight's tokenizer (163840), from the moonlight-16b-a3b preset; "
        "the paper does not state its scaling-law models' vocabulary",
        "setup": setup,
        "runs": report,
        "wall_time_s": time.perf_counter() - started,
    }


def pod_markdown(pod: dict) -> str:
    lines = [
        "| run | params (total / non-emb.) | FLOPs/token (6N non-emb.) | steps x batch x seq | tokens "
        "(x compute-opt.) | run FLOPs | peak GiB/device |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in pod["runs"].values():
        p, c = r["parameters"], r["config"]
        lines.append(
            f"| {r['label']} | {p['total'] / 1e6:.0f}M / {p['total_non_embedding'] / 1e6:.0f}M "
            f"| {r['flops_per_token']:.3g} ({r['six_n_non_embedding']:.3g}) "
            f"| {c['steps']} x {c['batch_size']} x {c['seq_len']} (grad_accum {c['grad_accum']}) "
            f"| {r['tokens']:.3g} (x{r['over_training_factor']:.1f}) | {r['run_flops']:.3g} "
            f"| {r['peak_bytes_per_device'] / 2**30:.2f} |"
        )
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = common.arguments(NAME, __doc__, argv)
    out = pathlib.Path(args.out)
    if args.scale == "pod":
        pod = run_pod(args)
        print(f"vocab {pod['vocab_size']} ({pod['vocab_assumption']})")
        return common.report_pod(out, PAPER, args.quick, pod, pod_markdown(pod))

    results = {"paper": PAPER, **run_cpu(args)}
    s = results["setup"]
    print(
        f"\n{s['parameters']['total_non_embedding']:,} non-embedding parameters, "
        f"{s['tokens'] / 1e6:.2f}M tokens = {s['tokens_per_non_embedding_parameter']:.3g} "
        f"tokens/param (x{s['over_training_factor']:.2g} compute-optimal, "
        f"{s['epochs']:.2f} epochs of the corpus)\n"
    )
    print(markdown(results))
    print(f"\nwall time {results['wall_time_s']:.0f} s in all")
    path = common.write_results(out, results)
    plot(results, out / f"{NAME}.png",
         f"Weight decay, Figure 2 ({'quick' if args.quick else 'cpu'}): "
         f"{s['parameters']['total_non_embedding'] / 1e3:.0f}k non-emb. params, "
         f"{s['tokens'] / 1e6:.1f}M tokens (x{s['over_training_factor']:.1f} compute-optimal)")  # fmt: skip
    print(f"wrote {path} and {out / f'{NAME}.png'}")
    return 0


if __name__ == "__main__":
    common.start_jax()
    sys.exit(main())
