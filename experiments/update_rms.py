"""Update RMS: Table 1 and Table 8 of "Muon is Scalable for LLM Training".

    python experiments/update_rms.py                 # --scale cpu: 10 runs, ~17 min on 2 cores
    python experiments/update_rms.py --quick         # toy sizes, end to end in seconds
    python experiments/update_rms.py --scale pod [--mesh data=8]   # build + inspect, no training

First AdamW with learning rates 3e-3, 1e-2, 3e-2 (weight decay 0.1, betas
0.9 / 0.95); every Muon run then uses AdamW's best rate, the paper's protocol
(its RMS matching lets Muon reuse AdamW's tuned learning rate and decay).

Part A (Table 1, Sec. 3.1): Muon with the three update-scale rules at that
learning rate and weight decay 0.1 --
  Baseline     (Eq. 5)  W -= lr (0.2 sqrt(H) O + wd W),          H = d_model
  Update Norm  (Eq. 6)  W -= lr (0.2 O / RMS(O) + wd W)
  Adjusted LR  (Eq. 7)  W -= lr (0.2 sqrt(max(A, B)) O + wd W)
on a dense model whose MLP matrices are [H, 4H] (SwiGLU gate/up D x 4D, down
4D x D; the paper swapped in a plain 2-layer MLP of the same shape), so that
Baseline's MLP update RMS is half the others'. Reported: eval loss, the weight
RMS of every matrix group (the paper shows AttnQ [H, H] and MLP [H, 4H]) and the
update RMS of the last step per group, measured from the last two checkpoints:
  U = -(W_N - W_{N-1}) / lr_N - wd W_{N-1}     (the scaled O, or AdamW's step)

Part B (Table 8, App.): Adjusted LR with rms_scale 0.05 .. 0.8 (0.2 is Part
A's run) against AdamW at the same (its best) learning rate: train/eval loss, AttnQ and MLP
weight RMS.

Writes results/update_rms/results.json (every number, the configs, the paper's
numbers, wall times) and update_rms.png; prints both tables beside the paper's.
--scale pod builds the paper's configs (Table 2's 822M row, dense, MLP [H, 4H])
and reports parameters, FLOPs and `inspect`'s per-device peak memory on --mesh.
"""

from __future__ import annotations

import math
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "update_rms"

RULES = {  # update_scale -> the paper's name (Table 1)
    "hidden": "Baseline",
    "update_norm": "Update Norm",
    "moonlight": "Adjusted LR",
}
RMS_SCALES = (0.05, 0.1, 0.2, 0.4, 0.8)
QUICK_RMS_SCALES = (0.2, 0.8)  # --quick: Part A's 0.2 and one more, for the scale check
ADAMW_LEARNING_RATES = (3e-3, 1e-2, 3e-2)  # AdamW's sweep; every Muon run uses its best

PAPER = {
    "table1": {  # 800M model, 4B of a 20B-token schedule, MLP [H, 4H]
        "Baseline": {
            "train_loss": 2.734,
            "eval_loss": 2.812,
            "AttnQ_weight_rms": 3.586e-2,
            "Dense_weight_rms": 2.52e-2,
        },
        "Update Norm": {
            "train_loss": 2.72,
            "eval_loss": 2.789,
            "AttnQ_weight_rms": 4.918e-2,
            "Dense_weight_rms": 5.01e-2,
        },
        "Adjusted LR": {
            "train_loss": 2.721,
            "eval_loss": 2.789,
            "AttnQ_weight_rms": 3.496e-2,
            "Dense_weight_rms": 4.89e-2,
        },
    },
    "table8": {  # "small-scale models", 2k steps (about 2B tokens)
        "AdamW": {
            "train_loss": 3.512,
            "eval_loss": 3.679,
            "AttnQ_weight_rms": 1.01e-2,
            "Dense_weight_rms": 1.25e-2,
        },
        "0.05": {
            "train_loss": 3.355,
            "eval_loss": 3.503,
            "AttnQ_weight_rms": 5.74e-3,
            "Dense_weight_rms": 8.01e-3,
        },
        "0.1": {
            "train_loss": 3.239,
            "eval_loss": 3.374,
            "AttnQ_weight_rms": 8.44e-3,
            "Dense_weight_rms": 1.27e-2,
        },
        "0.2": {
            "train_loss": 3.198,
            "eval_loss": 3.325,
            "AttnQ_weight_rms": 1.57e-2,
            "Dense_weight_rms": 2.35e-2,
        },
        "0.4": {
            "train_loss": 3.199,
            "eval_loss": 3.314,
            "AttnQ_weight_rms": 2.95e-2,
            "Dense_weight_rms": 4.51e-2,
        },
        "0.8": {
            "train_loss": 3.386,
            "eval_loss": 3.543,
            "AttnQ_weight_rms": 7.23e-2,
            "Dense_weight_rms": 8.73e-2,
        },
    },
}


def rms_scales(quick: bool = False) -> tuple[float, ...]:
    return QUICK_RMS_SCALES if quick else RMS_SCALES


def settings(quick: bool = False) -> dict[str, dict]:
    """name -> the TrainConfig fields that make it; 8 runs, 5 with --quick
    (Adjusted LR at 0.2 is both Table 1's third row and Table 8's 0.2 column)."""
    runs = {
        f"muon-{rule}": dict(optimizer="muon", update_scale=rule, rms_scale=0.2) for rule in RULES
    }
    for scale in rms_scales(quick):
        if scale != 0.2:
            runs[f"muon-rms{scale}"] = dict(
                optimizer="muon", update_scale="moonlight", rms_scale=scale
            )
    runs["adamw"] = dict(optimizer="adamw")
    return runs


def table1_rows() -> dict[str, str]:  # paper row -> our setting
    return {paper: f"muon-{rule}" for rule, paper in RULES.items()}


def table8_columns(quick: bool = False) -> dict[str, str]:  # paper column -> our setting
    columns = {"AdamW": "adamw"}
    for scale in rms_scales(quick):
        columns[str(scale)] = "muon-moonlight" if scale == 0.2 else f"muon-rms{scale}"
    return columns


# --- scale cpu: train -------------------------------------------------------------------


def cpu_base(quick: bool) -> dict:
    """The shared TrainConfig fields of the CPU runs. A dense model (every layer
    dense) with MLP width 4 d_model and full MHA (q_proj [D, D]), byte-level on
    the Python standard library's source."""
    if quick:
        model = dict(
            d_model=32,
            n_layers=1,
            first_k_dense=1,
            intermediate_size=128,
            n_heads=2,
            attention="mha",
            head_dim=16,
        )
        return dict(
            preset="tiny",
            model=model,
            steps=4,
            batch_size=8,
            seq_len=32,
            learning_rate=3e-3,
            weight_decay=0.1,
            warmup_steps=1,
            eval_batches=1,
        )
    model = dict(
        d_model=128,
        n_layers=4,
        first_k_dense=4,
        intermediate_size=512,
        n_heads=4,
        attention="mha",
        head_dim=32,
    )
    return dict(
        preset="tiny",
        model=model,
        steps=240,
        batch_size=16,
        seq_len=128,
        learning_rate=3e-3,
        weight_decay=0.1,
        warmup_steps=15,
        eval_batches=8,
    )


def rms(arrays) -> float:
    """RMS over every entry of a list of arrays."""
    squares = sum(float(np.sum(np.square(np.asarray(a, np.float64)))) for a in arrays)
    return math.sqrt(squares / sum(np.size(a) for a in arrays))


def group_rms(params) -> dict[str, float]:
    return {g: rms(leaves) for g, leaves in common.leaves_by_group(params).items()}


def update_rms(before, after, lr: float, wd: float) -> dict[str, float]:
    """Per group, the RMS of the last step's update before the learning rate and
    the decay: U = -(W_N - W_{N-1}) / lr - wd W_{N-1} (Muon's scaled O, AdamW's
    m/sqrt(v)); both optimizers apply W -= lr (U + wd W)."""
    old, new = common.leaves_by_group(before), common.leaves_by_group(after)
    out = {}
    for group in old:
        steps = [
            -(np.asarray(b, np.float64) - np.asarray(a, np.float64)) / lr
            - wd * np.asarray(a, np.float64)
            for a, b in zip(old[group], new[group], strict=True)
        ]
        out[group] = rms(steps)
    return out


def train_one(config, log):
    """Trains `config`, checkpointing only steps N-1 and N (checkpoint_every =
    N-1, keep_checkpoints = 2), and returns the run's numbers."""
    from muonjax.train import read_metrics, run
    from muonjax.train.optimizers import learning_rate_schedule

    steps = config.steps
    started = time.perf_counter()
    summary = run(config, log=log)
    wall = time.perf_counter() - started
    before, after = common.params_at(config.out, steps - 1), common.params_at(config.out)
    if summary.skipped_steps:
        raise RuntimeError(f"{config.out}: skipped (non-finite) steps; the lr below would be off")
    # the last update is the optimizer's count N-1 on the schedule
    lr = float(learning_rate_schedule(config)(steps - 1))
    metrics = read_metrics(config.out)
    losses = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    tail = [loss for _, loss in losses[-max(len(losses) // 10, 1) :]]
    last_logged = next((r for r in reversed(metrics) if "loss" in r), {})
    return {
        # mean of the last tenth of the logged steps' training losses
        "train_loss": float(np.mean(tail)),
        "eval_loss": float(summary.eval_loss),
        "weight_rms": group_rms(after),
        "update_rms": update_rms(before, after, lr, config.weight_decay),
        "last_learning_rate": lr,
        # the trainer's own RMS per optimizer group (its update: times lr, with decay)
        "last_logged": {k: float(v) for k, v in last_logged.items() if "rms" in k},
        "loss_curve": losses,
        "eval_curve": evals,
        "tokens": summary.tokens,
        "tokens_per_s": summary.tokens_per_s,
        "wall_time_s": wall,
    }


def run_cpu(args) -> dict:
    import jax

    from muonjax.train import TrainConfig

    base = cpu_base(args.quick)
    steps = base["steps"]
    results = {"scale": "cpu", "quick": args.quick, "base": base, "runs": {}, "configs": {}}
    started = time.perf_counter()
    quiet = lambda *_: None
    with tempfile.TemporaryDirectory(prefix="update_rms-") as tmp:

        def train(name, fields):
            config = TrainConfig(
                out=str(pathlib.Path(tmp) / name),
                **{**base, **fields},
                eval_every=steps,
                log_every=max(steps // 30, 1),
                checkpoint_every=steps - 1,  # saves N-1 and N: the last update
                keep_checkpoints=2,
                progress=False,
                mesh=None,  # every device on data
            )
            print(f"{name}: training {steps} steps ...", flush=True)
            r = train_one(config, quiet)
            results["configs"][name] = {**config.to_json(), "out": None}
            print(
                f"{name}: eval loss {r['eval_loss']:.4f}, train loss {r['train_loss']:.4f}, "
                f"{r['wall_time_s']:.0f} s",
                flush=True,
            )
            return r

        # The paper's protocol: AdamW's learning rate, tuned, then reused by Muon.
        lrs = (base["learning_rate"],) if args.quick else ADAMW_LEARNING_RATES
        sweep = {
            lr: train(f"adamw-lr{lr}", dict(optimizer="adamw", learning_rate=lr)) for lr in lrs
        }
        best = min(sweep, key=lambda lr: sweep[lr]["eval_loss"])
        results["adamw_sweep"] = {str(lr): r for lr, r in sweep.items()}
        results["learning_rate"] = best
        for name, fields in settings(args.quick).items():
            if name == "adamw":
                results["runs"][name] = sweep[best]
            else:
                results["runs"][name] = train(name, {**fields, "learning_rate": best})
    results["wall_time_s"] = time.perf_counter() - started
    results["devices"] = jax.device_count()
    return results


# --- scale pod: build and inspect -------------------------------------------------------

# Table 2's 822M row (16 layers, hidden 2048, 16 heads), made dense with MLP [H, 4H];
# the moonlight-16b-a3b preset gives the vocabulary (Moonlight's tokenizer, 163840),
# bfloat16 activations and remat.
POD_MODEL = dict(
    d_model=2048,
    n_layers=16,
    first_k_dense=16,
    intermediate_size=8192,
    n_heads=16,
    attention="mha",
    head_dim=128,
)
POD_QUICK_MODEL = dict(
    d_model=64,
    n_layers=1,
    first_k_dense=1,
    intermediate_size=256,
    n_heads=4,
    attention="mha",
    head_dim=16,
)


def pod_setup(quick: bool, data_parallel: int) -> dict:
    """The paper's runs. Table 1: 4B tokens of a 20B-token schedule at 160 x 8K
    sequences per step; Table 8: 2k steps (the paper does not say its model or
    batch: we take the same). One sequence per data-parallel rank per micro-batch."""
    if quick:
        preset, model, seq_len, batch = "tiny", POD_QUICK_MODEL, 64, 2 * data_parallel
        table1_tokens, schedule_tokens, table8_steps = 4 * batch * seq_len, 20 * batch * seq_len, 4
    else:
        preset, model, seq_len, batch = "moonlight-16b-a3b", POD_MODEL, 8192, 160
        table1_tokens, schedule_tokens, table8_steps = 4e9, 20e9, 2000
    tokens_per_step = batch * seq_len
    return dict(
        base=dict(
            preset=preset,
            model=model,
            seq_len=seq_len,
            batch_size=batch,
            grad_accum=batch // data_parallel,
            learning_rate=8.825e-4,
            weight_decay=0.1,
        ),
        # warmup: not stated by the paper; ours
        table1=dict(
            steps=round(table1_tokens / tokens_per_step),
            decay_steps=round(schedule_tokens / tokens_per_step),
            warmup_steps=1 if quick else 500,
        ),
        table8=dict(steps=table8_steps, decay_steps=table8_steps, warmup_steps=1 if quick else 100),
    )


def run_pod(args) -> dict:
    from muonjax.models import flops_per_token, param_counts
    from muonjax.parallel.mesh import make_mesh, parse_mesh
    from muonjax.train import TrainConfig
    from muonjax.train.costs import step_costs

    sizes = parse_mesh(args.mesh)
    mesh = make_mesh(sizes)
    data_parallel = sizes["data"] * sizes["expert"]
    setup = pod_setup(args.quick, data_parallel)
    table1 = set(table1_rows().values())
    started = time.perf_counter()
    report, inspected = {}, {}
    for name, fields in settings(args.quick).items():
        schedule = setup["table1"] if name in table1 else setup["table8"]
        config = TrainConfig(
            out=f"runs/{NAME}/{name}", **setup["base"], **fields, **schedule, mesh=args.mesh
        )
        model = config.model_config()
        # The rules and rms_scale change one scalar factor per matrix (Update Norm
        # also takes each update's norm): every Muon setting has the same shapes,
        # buffers and, to a few FLOPs per matrix, cost. Inspect one per optimizer.
        key = config.optimizer
        if key not in inspected:
            t = time.perf_counter()
            inspected[key] = {
                **step_costs(config, mesh),
                "inspected_setting": name,
                "inspect_s": time.perf_counter() - t,
            }
            print(f"{name}: inspected in {inspected[key]['inspect_s']:.0f} s", flush=True)
        per_token = flops_per_token(model, config.seq_len)
        tokens = config.steps * config.batch_size * config.seq_len
        report[name] = {
            "config": config.to_json(),
            "model": model.__dict__.copy(),
            "parameters": param_counts(model),
            "flops_per_token": per_token,
            "tokens": tokens,
            "run_flops": float(per_token) * tokens,
            "inspect": inspected[key],
            "peak_bytes_per_device": inspected[key]["peak_bytes"],
        }
    return {
        "mesh": args.mesh,
        "vocab_size": report[next(iter(report))]["model"]["vocab_size"],
        "setup": setup,
        "runs": report,
        "wall_time_s": time.perf_counter() - started,
    }


# --- report -----------------------------------------------------------------------------


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.3f}" if abs(x) >= 0.1 else f"{x:.3g}")


def table1_markdown(runs: dict) -> str:
    lines = [
        "| Method | eval loss (paper) | ours | AttnQ weight RMS (paper) | ours | MLP weight RMS "
        "(paper) | ours | AttnQ update RMS | MLP update RMS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for paper, name in table1_rows().items():
        p, r = PAPER["table1"][paper], runs[name]
        lines.append(
            f"| {paper} | {_fmt(p['eval_loss'])} | {_fmt(r['eval_loss'])} "
            f"| {_fmt(p['AttnQ_weight_rms'])} | {_fmt(r['weight_rms'].get('AttnQ'))} "
            f"| {_fmt(p['Dense_weight_rms'])} | {_fmt(r['weight_rms'].get('Dense'))} "
            f"| {_fmt(r['update_rms'].get('AttnQ'))} | {_fmt(r['update_rms'].get('Dense'))} |"
        )
    return "\n".join(lines)


def table8_markdown(runs: dict, quick: bool = False) -> str:
    columns = table8_columns(quick)
    lines = [
        "| | " + " | ".join(c if c == "AdamW" else f"{c} RMS" for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    rows = [
        ("train loss", "train_loss", lambda r: r["train_loss"]),
        ("eval loss", "eval_loss", lambda r: r["eval_loss"]),
        ("AttnQ weight RMS", "AttnQ_weight_rms", lambda r: r["weight_rms"].get("AttnQ")),
        ("MLP weight RMS", "Dense_weight_rms", lambda r: r["weight_rms"].get("Dense")),
    ]
    for label, key, ours in rows:
        lines.append(
            f"| {label}, paper | "
            + " | ".join(_fmt(PAPER["table8"][c][key]) for c in columns)
            + " |"
        )
        lines.append(
            f"| {label}, ours | " + " | ".join(_fmt(ours(runs[n])) for n in columns.values()) + " |"
        )
    lines.append(
        "| MLP update RMS, ours | "
        + " | ".join(_fmt(runs[n]["update_rms"].get("Dense")) for n in columns.values())
        + " |"
    )
    return "\n".join(lines)


def plot(runs: dict, path: pathlib.Path, title: str, quick: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    # Table 1's rules, then Table 8's sweep in order (its 0.2 bar is Adjusted LR's run again)
    labels = list(table1_rows())
    names = list(table1_rows().values())
    for column, name in table8_columns(quick).items():
        if column != "AdamW":
            labels.append(f"rms {column}")
            names.append(name)
    x = np.arange(len(names))
    evals = [runs[n]["eval_loss"] for n in names]
    left.bar(x, evals, color=["C0"] * 3 + ["C1"] * (len(names) - 3))
    left.axhline(runs["adamw"]["eval_loss"], color="k", ls="--", label="AdamW")
    low, high = min(evals + [runs["adamw"]["eval_loss"]]), max(evals + [runs["adamw"]["eval_loss"]])
    left.set_ylim(low - 0.1 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
    left.set_xticks(x, labels, rotation=30, ha="right")
    left.set_ylabel("eval loss")
    left.set_title("Table 1: rules at rms 0.2 (blue); Table 8: Adjusted LR's rms (orange)")
    left.legend()
    width = 0.38
    for i, group in enumerate(("AttnQ", "Dense")):
        values = [runs[n]["weight_rms"].get(group, np.nan) for n in names]
        right.bar(x + (i - 0.5) * width, values, width, label=f"{group} weight RMS")
        right.axhline(
            runs["adamw"]["weight_rms"].get(group, np.nan),
            color=f"C{i}",
            ls="--",
            label=f"{group}, AdamW",
        )
    right.set_xticks(x, labels, rotation=30, ha="right")
    right.set_ylabel("weight RMS (MLP = Dense group)")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def pod_markdown(pod: dict) -> str:
    lines = [
        "| setting | params (total / non-emb.) | FLOPs/token | steps | run FLOPs | peak GiB/device |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in pod["runs"].items():
        p = r["parameters"]
        lines.append(
            f"| {name} | {_count(p['total'])} / {_count(p['total_non_embedding'])} "
            f"| {r['flops_per_token']:.3g} | {r['config']['steps']} of {r['config']['decay_steps']} "
            f"| {r['run_flops']:.3g} | {r['peak_bytes_per_device'] / 2**30:.3g} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = common.arguments(NAME, __doc__, argv)
    out = pathlib.Path(args.out)
    if args.scale == "pod":
        pod = run_pod(args)
        print(f"vocab {pod['vocab_size']}")
        return common.report_pod(out, PAPER, args.quick, pod, pod_markdown(pod))

    cpu = run_cpu(args)
    results = {"paper": PAPER, "quick": args.quick, **cpu}
    runs = cpu["runs"]
    print("\nTable 1 (paper: 800M, 4B of 20B tokens; ours: see results.json 'base')\n")
    print(table1_markdown(runs))
    print("\nTable 8 (paper: 2k steps, about 2B tokens)\n")
    print(table8_markdown(runs, args.quick))
    print(f"\nwall time {cpu['wall_time_s']:.0f} s in all")
    path = common.write_results(out, results)
    plot(
        runs,
        out / f"{NAME}.png",
        f"Update RMS rules and scales ({'quick' if args.quick else 'cpu'})",
        args.quick,
    )
    print(f"wrote {path} and {out / f'{NAME}.png'}")
    return 0


if __name__ == "__main__":
    common.start_jax()
    sys.exit(main())
