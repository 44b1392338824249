"""Fine-tuning: Sec. 3.4 and Table 6 of "Muon is Scalable for LLM Training".

    python experiments/finetune.py                 # --scale cpu: 2 pretraining + 12 SFT runs, ~9 min
    python experiments/finetune.py --quick         # toy sizes, end to end in seconds
    python experiments/finetune.py --scale pod [--mesh data=8]   # build + inspect, no training

2 x 2: pretrain with Muon or AdamW, then fine-tune (SFT) each with Muon or
AdamW. The SFT task is built offline from this machine's Python standard
library: prompt = a function's signature and docstring, response = its body
(loss on the response only, --data-format sft-jsonl). A fixed fifth of the
standard library's files (by a hash of the path) is held out of pretraining and
supplies the SFT pairs; the pairs of the last fifth of those files (in path
order) are held out of SFT too and are what every fine-tune is evaluated on, so
the evaluation functions were never seen, in pretraining or SFT.

Pretraining: one dense byte-level model, both optimizers at the same learning
rate (AdamW's best at this scale in experiments/update_rms.py; the paper's
protocol reuses AdamW's rate for Muon), weight decay 0.1, cosine. SFT: fresh
optimizer state (the paper's setting: the SFT optimizer differs from the
pretraining one in half the cells), every cell swept over SFT_LEARNING_RATES,
extended by half-decades while a cell's best rate is at the edge of those tried;
the best kept (the same rule for both SFT optimizers). Reported: the held-out
response loss of every cell, and of the pretrained models before SFT.

Paper (Table 6: Moonlight@1.2T tokens, SFT on tulu-3; MMLU / HumanEval / GSM8K):
Muon+Muon 55.7 / 57.3 / 68.0 is best; when pretraining and SFT optimizers
differ, Muon-SFT shows no clear advantage over AdamW-SFT.

Writes results/finetune/results.json and finetune.png. --scale pod builds the
paper's setting as far as muonjax expresses it (the Moonlight-16B-A3B MoE,
8K sequences, tulu-3-sized SFT) and reports parameters, FLOPs and `inspect`'s
per-device peak memory on --mesh.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import itertools
import json
import pathlib
import shutil
import sys
import tempfile
import textwrap
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "finetune"

OPTIMIZERS = ("muon", "adamw")
LABELS = {"muon": "Muon", "adamw": "AdamW"}
PRETRAIN_LEARNING_RATE = 1e-2
SFT_LEARNING_RATES = (3e-4, 1e-3, 3e-3)  # extended along common.RATE_LADDER past an edge
HELD_OUT_BUCKETS = 5  # one file in five (by path hash) is held out of pretraining
EVAL_FILE_FRACTION = 0.2  # of the held-out files: the last fifth is evaluation only
MAX_EXAMPLE_CHARS = 1200

PAPER = {
    "setting": "Moonlight@1.2T tokens (Muon) and its AdamW counterpart, SFT on tulu-3 "
    "with Muon or AdamW (Sec. 3.4, Table 6)",
    "table6": {  # pretrain + SFT optimizer: MMLU, HumanEval, GSM8K
        "Muon+Muon": {"MMLU": 55.7, "HumanEval": 57.3, "GSM8K": 68.0},
        "AdamW+Muon": {"MMLU": 55.3, "HumanEval": 53.7, "GSM8K": 62.1},
        "Muon+AdamW": {"MMLU": 50.2, "HumanEval": 52.4, "GSM8K": 64.9},
        "AdamW+AdamW": {"MMLU": 52.0, "HumanEval": 53.1, "GSM8K": 64.6},
    },
    "claims": {
        "best": "Muon-pretrained + Muon-SFT is best on all three benchmarks",
        "mismatch": "when pretraining and SFT optimizers differ, Muon-SFT shows no clear "
        "advantage over AdamW-SFT",
    },
}


# --- the SFT task -----------------------------------------------------------------------


def held_out(relative: str) -> bool:
    """Whether a standard-library file (path relative to the library) is held
    out of pretraining: a fixed fifth, by a hash of its path."""
    return int(hashlib.sha256(relative.encode()).hexdigest(), 16) % HELD_OUT_BUCKETS == 0


def function_pairs(source: str) -> list[tuple[str, str]]:
    """(prompt, response) for each function with a docstring and a body after
    it: prompt = the `def` line(s) and docstring, response = the rest of the
    body, both dedented to the `def`'s indentation; decorators left out."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines(keepends=True)
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if ast.get_docstring(node) is None or len(node.body) < 2:
            continue
        text = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
        split = node.body[0].end_lineno - node.lineno + 1  # lines up to the docstring's end
        text_lines = text.splitlines(keepends=True)
        prompt, response = "".join(text_lines[:split]), "".join(text_lines[split:])
        if response.strip() and len(prompt) + len(response) <= MAX_EXAMPLE_CHARS:
            pairs.append((prompt, response if response.endswith("\n") else response + "\n"))
    return pairs


def build_task(folder: pathlib.Path, quick: bool) -> dict:
    """Writes FOLDER/pretrain/ (the library minus the held-out files, as text)
    and FOLDER/sft.jsonl (SFT pairs then evaluation pairs); returns what it wrote."""
    from muonjax.train.corpus import stdlib_files

    root, files = stdlib_files()
    kept, out_files = [], []
    for path in files:
        (out_files if held_out(str(path.relative_to(root))) else kept).append(path)
    found = {f: function_pairs(f.read_text(encoding="utf-8", errors="replace")) for f in out_files}
    out_files = [f for f in out_files if found[f]]
    if quick:  # a slice of the library, enough for a few batches
        kept, out_files = kept[:40], out_files[:10]
    pretrain = folder / "pretrain"
    for path in kept:
        target = pretrain / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    n_eval = max(round(len(out_files) * EVAL_FILE_FRACTION), 1)
    sft_files, eval_files = out_files[:-n_eval], out_files[-n_eval:]
    pairs = {"sft": [p for f in sft_files for p in found[f]],
             "eval": [p for f in eval_files for p in found[f]]}  # fmt: skip
    with (folder / "sft.jsonl").open("w") as f:
        for prompt, response in pairs["sft"] + pairs["eval"]:
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    relative = lambda group: [str(p.relative_to(root)) for p in group]  # noqa: E731
    return {
        "python": sys.version.split()[0],
        "pretrain_files": len(kept),
        "held_out_files_with_pairs": len(out_files),
        "sft_files": relative(sft_files),
        "eval_files": relative(eval_files),
        "sft_pairs": len(pairs["sft"]),
        "eval_pairs": len(pairs["eval"]),
        # the trainer holds out the last `validation_fraction` of the pairs: exactly the eval ones
        "validation_fraction": len(pairs["eval"]) / (len(pairs["sft"]) + len(pairs["eval"])),
        "example": dict(zip(("prompt", "response"), pairs["eval"][0])),
    }


# --- scale cpu: train -------------------------------------------------------------------


def cpu_setup(quick: bool) -> tuple[dict, dict, tuple]:
    """(pretraining fields, SFT fields, SFT learning rates)."""
    if quick:
        model = dict(d_model=32, n_layers=1, first_k_dense=1, intermediate_size=88,
                     n_heads=2, attention="mha", head_dim=16)  # fmt: skip
        pretrain = dict(preset="tiny", model=model, steps=12, batch_size=8, seq_len=64,
                        warmup_steps=2, eval_every=12, eval_batches=1, checkpoint_every=12)  # fmt: skip
        # SFT's schedule and shapes equal pretraining's: one compiled step per optimizer
        sft = {k: v for k, v in pretrain.items() if k not in ("preset", "model")}
        return pretrain, sft, (PRETRAIN_LEARNING_RATE,)
    # ~150k non-embedding parameters, 2.6M pretraining tokens (~17 per parameter)
    model = dict(d_model=64, n_layers=3, first_k_dense=3, intermediate_size=176,
                 n_heads=4, attention="mha", head_dim=16)  # fmt: skip
    pretrain = dict(preset="tiny", model=model, steps=640, batch_size=32, seq_len=128,
                    warmup_steps=20, eval_every=160, eval_batches=8, checkpoint_every=640)  # fmt: skip
    sft = dict(steps=150, batch_size=16, seq_len=128, warmup_steps=10, eval_every=50,
               eval_batches=8, checkpoint_every=150)  # fmt: skip
    return pretrain, sft, SFT_LEARNING_RATES


def train(fields: dict, out: pathlib.Path) -> dict:
    from muonjax.train import TrainConfig, read_metrics, run

    config = TrainConfig(out=str(out), progress=False, mesh=None, **fields)
    started = time.perf_counter()
    summary = run(config, log=lambda *_: None)
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    return {
        "eval_loss": float(summary.eval_loss),
        "train_loss": float(summary.loss),
        "eval_curve": {
            "step": [r["step"] for r in evals],
            "eval_loss": [float(r["eval_loss"]) for r in evals],
        },  # fmt: skip
        "tokens_per_s": summary.tokens_per_s,
        "wall_time_s": time.perf_counter() - started,
        "config": {**config.to_json(), "out": None, "data": None, "init_from": None},
    }


def pretrained_sft_loss(run_dir: pathlib.Path, sft: pathlib.Path, task: dict, sft_fields: dict):
    """The held-out response loss of a pretrained model before SFT, computed as
    the trainer evaluates (same batches: --eval-batches of the validation pairs)."""
    import jax.numpy as jnp
    from flax import nnx

    from muonjax.models import Transformer
    from muonjax.train import TrainConfig
    from muonjax.train.data import load_data
    from muonjax.train.pipeline import TokenWindows, eval_batches
    from muonjax.train.step import lm_loss

    saved = json.loads((run_dir / "config.json").read_text())
    config = dataclasses.replace(
        TrainConfig.from_json(saved["train"]), **sft_fields, data=(str(sft),),
        data_format="sft-jsonl", validation_fraction=task["validation_fraction"],
    )  # fmt: skip
    model_config = config.model_config(vocab_size=saved["model"]["vocab_size"])
    graphdef, params, rest = nnx.split(Transformer(model_config, rngs=nnx.Rngs(0)), nnx.Param, ...)
    nnx.replace_by_pure_dict(params, common.strip_values(common.params_at(run_dir)))
    data = load_data(config, run_dir)
    batches = eval_batches(TokenWindows(data.validation_tokens, config.seq_len),
                           config.batch_size, config.eval_batches, spread=False)  # fmt: skip
    return float(np.mean([lm_loss(graphdef, params, rest, jnp.asarray(b))[0] for b in batches]))


def run_cpu(args) -> dict:
    import jax

    pretrain_fields, sft_fields, rates = cpu_setup(args.quick)
    started = time.perf_counter()
    results = {"scale": "cpu", "quick": args.quick, "pretrain": {}, "sft": {},
               "sft_learning_rates": list(rates)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="finetune-") as tmp:
        tmp = pathlib.Path(tmp)
        task = build_task(tmp, args.quick)
        results["task"] = task
        print(f"task: pretraining on {task['pretrain_files']} files; SFT {task['sft_pairs']} "
              f"pairs, evaluation {task['eval_pairs']} pairs from {len(task['eval_files'])} "
              f"unseen files", flush=True)  # fmt: skip
        for opt in OPTIMIZERS:
            fields = dict(pretrain_fields, optimizer=opt, learning_rate=PRETRAIN_LEARNING_RATE,
                          data=(str(tmp / "pretrain"),))  # fmt: skip
            r = train(fields, tmp / f"pretrain-{opt}")
            r["sft_eval_loss_before_sft"] = pretrained_sft_loss(
                tmp / f"pretrain-{opt}", tmp / "sft.jsonl", task, sft_fields
            )
            results["pretrain"][opt] = r
            print(f"pretrain {LABELS[opt]}: eval {r['eval_loss']:.4f}, held-out response loss "
                  f"before SFT {r['sft_eval_loss_before_sft']:.4f}, {r['wall_time_s']:.0f} s",
                  flush=True)  # fmt: skip

        def fine_tune(pre, sft, lr):
            cell = f"{LABELS[pre]}+{LABELS[sft]}"
            fields = dict(sft_fields, optimizer=sft, learning_rate=lr,
                          preset=pretrain_fields["preset"], model=pretrain_fields["model"],
                          init_from=str(tmp / f"pretrain-{pre}"), data=(str(tmp / "sft.jsonl"),),
                          data_format="sft-jsonl",
                          validation_fraction=task["validation_fraction"])  # fmt: skip
            r = train(fields, tmp / f"sft-{pre}-{sft}-{lr:g}")
            results["sft"].setdefault(cell, {"pretrain": pre, "sft": sft, "runs": {}})
            results["sft"][cell]["runs"][f"{lr:g}"] = r
            print(f"{cell} lr {lr:g}: held-out response loss {r['eval_loss']:.4f}, "
                  f"{r['wall_time_s']:.0f} s", flush=True)  # fmt: skip
            return r["eval_loss"]

        for pre, sft in itertools.product(OPTIMIZERS, OPTIMIZERS):
            losses = {lr: fine_tune(pre, sft, lr) for lr in rates}
            while not args.quick and (lr := common.next_rate(losses)) is not None:
                losses[lr] = fine_tune(pre, sft, lr)  # the best rate was at the sweep's edge
    for cell in results["sft"].values():
        best = min(cell["runs"], key=lambda lr: cell["runs"][lr]["eval_loss"])
        cell["best_learning_rate"] = float(best)
        cell["eval_loss"] = cell["runs"][best]["eval_loss"]
        tried = [float(lr) for lr in cell["runs"]]
        cell["best_at_edge"] = len(tried) > 1 and float(best) in (min(tried), max(tried))
    results["comparison"] = compare(results["sft"])
    results["wall_time_s"] = time.perf_counter() - started
    results["devices"] = jax.device_count()
    return results


def compare(cells: dict) -> dict:
    """The paper's two claims in loss (lower is better): the best cell, and
    Muon-SFT minus AdamW-SFT per pretraining optimizer (< 0: Muon-SFT better)."""
    loss = {name: c["eval_loss"] for name, c in cells.items()}
    return {
        "best_cell": min(loss, key=loss.get),
        "muon_sft_minus_adamw_sft": {
            f"{LABELS[pre]}-pretrained": loss[f"{LABELS[pre]}+Muon"] - loss[f"{LABELS[pre]}+AdamW"]
            for pre in OPTIMIZERS
        },
        "muon_pretrain_minus_adamw_pretrain": {
            f"{LABELS[sft]}-SFT": loss[f"Muon+{LABELS[sft]}"] - loss[f"AdamW+{LABELS[sft]}"]
            for sft in OPTIMIZERS
        },
    }


# --- report -----------------------------------------------------------------------------


def markdown(results: dict) -> str:
    lines = ["| pretrain + SFT | held-out response loss (best SFT lr) | loss at each SFT lr | "
             "paper MMLU / HumanEval / GSM8K |", "|---|---|---|---|"]  # fmt: skip
    for name, cell in results["sft"].items():
        per_lr = ", ".join(f"{lr}: {r['eval_loss']:.4f}" for lr, r in cell["runs"].items())
        paper = " / ".join(str(v) for v in PAPER["table6"][name].values())
        lines.append(f"| {name} | {cell['eval_loss']:.4f} (lr {cell['best_learning_rate']:g}) "
                     f"| {per_lr} | {paper} |")  # fmt: skip
    lines += ["", "| pretrained with | pretraining eval loss | held-out response loss before SFT |",
              "|---|---|---|"]  # fmt: skip
    for opt, r in results["pretrain"].items():
        lines.append(
            f"| {LABELS[opt]} | {r['eval_loss']:.4f} | {r['sft_eval_loss_before_sft']:.4f} |"
        )
    c = results["comparison"]
    diffs = ", ".join(f"{k} {v:+.4f}" for k, v in c["muon_sft_minus_adamw_sft"].items())
    lines += ["", f"best cell: {c['best_cell']}; Muon-SFT minus AdamW-SFT: {diffs}"]
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bar_ax, lr_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    cells = results["sft"]
    names = list(cells)
    colors = ["tab:blue" if cells[n]["sft"] == "muon" else "tab:green" for n in names]
    losses = [cells[n]["eval_loss"] for n in names]
    bar_ax.bar(names, losses, color=colors)
    for i, v in enumerate(losses):
        bar_ax.annotate(f"{v:.4f}", (i, v), ha="center", va="bottom", fontsize=8)
    low, high = min(losses), max(losses)
    bar_ax.set_ylim(low - 2 * (high - low + 1e-3), high + (high - low + 1e-3))
    bar_ax.set_ylabel("held-out response loss (best SFT lr)")
    bar_ax.set_title("pretrain + SFT optimizer (Table 6's 2 x 2)")
    for name, cell in cells.items():
        lrs = sorted(cell["runs"], key=float)
        lr_ax.plot([float(lr) for lr in lrs], [cell["runs"][lr]["eval_loss"] for lr in lrs], marker="o",
                   ls="-" if cell["pretrain"] == "muon" else "--",
                   color="tab:blue" if cell["sft"] == "muon" else "tab:green", label=name)  # fmt: skip
    for opt, r in results["pretrain"].items():
        lr_ax.axhline(r["sft_eval_loss_before_sft"], color="grey",
                      ls="-" if opt == "muon" else "--", lw=0.8,
                      label=f"{LABELS[opt]}-pretrained, before SFT")  # fmt: skip
    lr_ax.set_xscale("log")
    lr_ax.set_xlabel("SFT peak learning rate")
    lr_ax.set_ylabel("held-out response loss")
    lr_ax.set_title("SFT learning-rate sweeps")
    lr_ax.legend(fontsize=7)
    for ax in (bar_ax, lr_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- scale pod: build and inspect -------------------------------------------------------


def pod_configs(quick: bool, mesh: str) -> dict:
    """Pretraining: the Moonlight-16B-A3B MoE (the paper's Table 6 models), 8K
    sequences, 2048 per step (Sec. 3.3's stage 1), lr 4.2e-4; SFT: the same
    model on 4K-token sequences, 128 per step, lr 2e-5 (our choice: the paper
    does not state its SFT hyper-parameters), for each SFT optimizer."""
    from muonjax.parallel.mesh import parse_mesh
    from muonjax.train import TrainConfig

    sizes = parse_mesh(mesh)
    dp = sizes["data"] * sizes["expert"]
    if quick:  # the tiny preset, one dense layer
        preset, model, seq, batch = "tiny", dict(n_layers=1, first_k_dense=1), 64, 2 * dp
        sft_seq, sft_batch = 64, 2 * dp
    else:
        preset, model, seq, batch = "moonlight-16b-a3b", {}, 8192, 2048
        sft_seq, sft_batch = 4096, 128
    for what, b in (("pretraining", batch), ("SFT", sft_batch)):
        if b % dp:
            raise SystemExit(f"--mesh: the data-parallel size {dp} does not divide the {what} "
                             f"batch of {b} sequences")  # fmt: skip
    configs = {}
    for opt in OPTIMIZERS:
        configs[f"pretrain-{opt}"] = TrainConfig(
            out=f"runs/{NAME}/pretrain-{opt}", preset=preset, model=model, optimizer=opt,
            seq_len=seq, batch_size=batch, grad_accum=batch // dp, learning_rate=4.2e-4, mesh=mesh,
            steps=20 if quick else round(1.2e12 / (batch * seq)), warmup_steps=2 if quick else 2000,
        )  # fmt: skip
        configs[f"sft-{opt}"] = TrainConfig(
            out=f"runs/{NAME}/sft-{opt}", preset=preset, model=model, optimizer=opt,
            seq_len=sft_seq, batch_size=sft_batch, grad_accum=sft_batch // dp, mesh=mesh,
            # --quick: pretraining's schedule too, so that its compiled step is reused
            learning_rate=4.2e-4 if quick else 2e-5, steps=20 if quick else 2000,
            warmup_steps=2 if quick else 100,
        )  # fmt: skip
    return configs


def run_pod(args) -> dict:
    from muonjax.models import flops_per_token, param_counts
    from muonjax.parallel.mesh import make_mesh, parse_mesh
    from muonjax.train.costs import step_costs

    mesh = make_mesh(parse_mesh(args.mesh))
    started = time.perf_counter()
    report = {}
    for name, config in pod_configs(args.quick, args.mesh).items():
        model = config.model_config()
        inspected = step_costs(config, mesh)
        tokens = config.steps * config.batch_size * config.seq_len
        per_token = flops_per_token(model, config.seq_len)
        report[name] = {
            "config": config.to_json(),
            "parameters": param_counts(model),
            "flops_per_token": per_token,
            "tokens": tokens,
            "run_flops": float(per_token) * tokens,
            "peak_bytes_per_device": inspected["peak_bytes"],
        }
        print(f"{name}: {inspected['peak_bytes'] / 2**30:.2f} GiB/device", flush=True)
    return {"mesh": args.mesh, "runs": report, "wall_time_s": time.perf_counter() - started}


def pod_markdown(pod: dict) -> str:
    lines = ["| run | params (total / active) | FLOPs/token | steps x batch x seq | tokens | "
             "run FLOPs | peak GiB/device |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in pod["runs"].items():
        p, c = r["parameters"], r["config"]
        lines.append(
            f"| {name} | {p['total'] / 1e9:.3g}B / {p['active'] / 1e9:.3g}B | {r['flops_per_token']:.3g} "
            f"| {c['steps']} x {c['batch_size']} x {c['seq_len']} (accum {c['grad_accum']}) "
            f"| {r['tokens']:.3g} | {r['run_flops']:.3g} | {r['peak_bytes_per_device'] / 2**30:.2f} |"
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
    t = results["task"]
    plot(results, out / f"{NAME}.png",
         f"Fine-tuning, Sec. 3.4 ({'quick' if args.quick else 'cpu'}): {t['sft_pairs']} SFT pairs, "
         f"{t['eval_pairs']} held-out pairs from unseen files")  # fmt: skip
    print(f"wrote {path} and {out / f'{NAME}.png'}")
    return 0


if __name__ == "__main__":
    common.start_jax()
    sys.exit(main())
