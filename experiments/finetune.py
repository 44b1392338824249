"""Fine-tuning: Sec. 3.4 and Table 6 of "Muon is Scalable for LLM Training".

    python experiments/finetune.py [--scale cpu|gpu|pod] [--quick] [--dry-run]

2 x 2: pretrain with Muon or AdamW, then fine-tune (SFT) each model with Muon
or AdamW (fresh optimizer state, --init-from the pretrained run). The SFT task
is built from Python source: prompt = a function's signature and docstring,
response = its body (loss on the response only, --data-format sft-jsonl). A
fixed fifth of the source files (by a hash of the path) is held out of
pretraining and supplies the SFT pairs, of which the trainer holds out
SFT_EVAL_FRACTION by the pair's hash: final_eval_loss scores every held-out
pair, one per row, its prompt always present.

Pretraining: each optimizer's rate on a quarter-decade grid from three rates,
extended while the best is at an edge, PRETRAIN_SEEDS at every rate, chosen on
seed means of final_eval_loss; the best rate's seed-0 model is fine-tuned. SFT:
each cell's rate on a quarter-decade grid (extended so too) with SFT seed
SELECT_SEED, then SFT_SEEDS (other seeds: no seed both picks and measures) at
the chosen rate. The pretrained models before SFT are scored by a 1-step SFT
run at learning rate 0 (warmup's first step: the parameters do not change; a
0-step run has no final evaluation). Reported: the 2 x 2 (mean ± 95% over SFT
seeds), paired differences over SFT seeds with verdicts (Muon+Muon against each
other cell: paper lower loss; AdamW-pretrained Muon-SFT - AdamW-SFT: paper "no
clear advantage", reproduced unless Muon-SFT is lower with 95% confidence, so
few seeds favour it), and the pretraining optimizer's effect (Muon - AdamW,
paired over pretraining seeds: paper lower).

cpu: the standard library, byte-level, d48 x 2, 400 steps of 16 x 128; SFT 100
steps of 16 x 128 on ~820 pairs, ~205 held out: 38-46 runs (2 x 6-8 pretraining,
2 before SFT, 4 x (3-4 + 3) SFT), ~20-30 min on 2 idle cores (estimated from
update_rms's d48 x 2 runs; not yet run at full size). gpu: the python
corpus (stdlib + site-packages), BPE 8192, bfloat16, d256 x 6, 3000 steps of
64 x 512 (~20 tokens per parameter; about 2 minutes a run on an H100:
estimated, not run); SFT 400 steps of 64 x 512. pod: the paper's
Moonlight-16B-A3B on the python corpus (BPE 32768), 1.2T tokens of 2048 x 8K
at 4.2e-4 (no sweep), one pretraining seed; SFT 200 steps of 128 x 4K at 2e-5
(the paper states none), 3 SFT seeds. OUT/ledger.json and OUT/runs/ make it
resumable; the task is written once to OUT/task/.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import pathlib
import sys
import textwrap

import numpy as np
import sweep

NAME = "finetune"
OPTIMIZERS = ("muon", "adamw")
LABELS = {"muon": "Muon", "adamw": "AdamW"}
CELLS = [(pre, sft) for pre in OPTIMIZERS for sft in OPTIMIZERS]
PRETRAIN_SEEDS, SELECT_SEED, SFT_SEEDS = (0, 1), 0, (1, 2, 3)
HELD_OUT_BUCKETS = 5  # one source file in five (by path hash) is held out of pretraining
MAX_EXAMPLE_CHARS = 1200
SFT_EVAL_FRACTION = 0.2  # of the SFT pairs, held out by the trainer (by each pair's hash)
PAPER = {
    "setting": "Moonlight@1.2T tokens (Muon) and its AdamW counterpart, SFT on tulu-3 "
    "with Muon or AdamW (Sec. 3.4, Table 6)",
    "table6": {  # pretrain + SFT optimizer: MMLU, HumanEval, GSM8K
        "Muon+Muon": {"MMLU": 55.7, "HumanEval": 57.3, "GSM8K": 68.0},
        "AdamW+Muon": {"MMLU": 55.3, "HumanEval": 53.7, "GSM8K": 62.1},
        "Muon+AdamW": {"MMLU": 50.2, "HumanEval": 52.4, "GSM8K": 64.9},
        "AdamW+AdamW": {"MMLU": 52.0, "HumanEval": 53.1, "GSM8K": 64.6},
    },
    "claims": {"best": "Muon-pretrained + Muon-SFT is best on all three benchmarks",
               "mismatch": "when pretraining and SFT optimizers differ, Muon-SFT shows no "
                           "clear advantage over AdamW-SFT"},
}  # fmt: skip
# (cell a, cell b, paper's sign of a - b in loss: -1 lower, 0 "no clear advantage", None: no claim)
COMPARISONS = (("Muon+Muon", "Muon+AdamW", -1), ("Muon+Muon", "AdamW+Muon", -1),
               ("Muon+Muon", "AdamW+AdamW", -1), ("AdamW+Muon", "AdamW+AdamW", 0),
               ("Muon+AdamW", "AdamW+AdamW", None))  # fmt: skip
MODEL_KEYS = ("preset", "model", "tokenizer", "bpe_vocab_size", "dtype", "remat")


def cell_name(pre: str, sft: str) -> str:
    return f"{LABELS[pre]}+{LABELS[sft]}"


# --- the SFT task ------------------------------------------------------------------------


def held_out(relative: str) -> bool:
    """Whether a source file (path relative to its library) is held out of pretraining."""
    return int(hashlib.sha256(relative.encode()).hexdigest(), 16) % HELD_OUT_BUCKETS == 0


def function_pairs(source: str) -> list[tuple[str, str]]:
    """(prompt, response) per function with a docstring and a body after it: the
    `def` line(s) and docstring, then the rest, dedented; decorators left out."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines, pairs = source.splitlines(keepends=True), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if ast.get_docstring(node) is None or len(node.body) < 2:
            continue
        text = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])).splitlines(True)
        split = node.body[0].end_lineno - node.lineno + 1  # lines up to the docstring's end
        prompt, response = "".join(text[:split]), "".join(text[split:]).rstrip("\n") + "\n"
        if response.strip() and len(prompt) + len(response) <= MAX_EXAMPLE_CHARS:
            pairs.append((prompt, response))
    return pairs


def build_task(folder: pathlib.Path, site_packages: bool, quick: bool) -> dict:
    """FOLDER/pretrain/ (the source minus the held-out files) and FOLDER/sft.jsonl
    (the held-out files' pairs), written once; what they hold (FOLDER/task.json)."""
    from muonjax.train import python_corpus
    from muonjax.train.corpus import split_examples, stdlib_files

    if (folder / "task.json").exists():
        return json.loads((folder / "task.json").read_text())
    root, files = stdlib_files()
    files = [(str(p.relative_to(root)), p) for p in files]
    if site_packages:  # the python corpus: the stdlib, then the installed distributions
        dists = python_corpus.distribution_files(python_corpus.site_dirs())
        files += [(f"site/{rel}", path) for _, _, found in dists for rel, path in found]
    kept = [(rel, p) for rel, p in files if not held_out(rel)]
    pairs = [pair for rel, p in files if held_out(rel)
             for pair in function_pairs(p.read_text(encoding="utf-8", errors="replace"))]  # fmt: skip
    if quick:  # enough for a few batches
        kept, pairs = kept[:40], pairs[:80]
    for rel, path in kept:
        (folder / "pretrain" / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / "pretrain" / rel).write_bytes(path.read_bytes())
    with (folder / "sft.jsonl").open("w") as f:
        f.writelines(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs)
    train, held = split_examples(pairs, SFT_EVAL_FRACTION)
    task = {"python": sys.version.split()[0], "pretrain_files": len(kept), "sft_pairs": len(train),
            "eval_pairs": len(held), "example": dict(zip(("prompt", "response"), held[0]))}  # fmt: skip
    sweep.write_json(folder / "task.json", task)
    return task


# --- the scales --------------------------------------------------------------------------


def _schedule(steps: int, warmup: int) -> dict:
    return dict(steps=steps, warmup_steps=warmup, eval_every=steps, log_every=max(steps // 20, 1),
                checkpoint_every=max(steps // 5, 1))  # fmt: skip


def scale_setup(scale: str, quick: bool, devices: int) -> dict:
    """Pretraining and SFT TrainConfig fields, each optimizer's first rates for
    both, whether sweeps extend, the seeds, and whether site-packages is read."""
    setup = dict(extend=not quick and scale != "pod", pretrain_seeds=PRETRAIN_SEEDS,
                 sft_seeds=SFT_SEEDS, site_packages=not quick and scale != "cpu")  # fmt: skip
    bpe = dict(tokenizer="bpe", dtype="bfloat16")
    if quick:  # toy sizes; SFT's shapes and schedule equal pretraining's (one compile each)
        sft = dict(batch_size=max(8, devices), seq_len=64, **_schedule(12, 2), eval_batches=1)
        pretrain = dict(sft, preset="tiny", model=sweep.dense_model(32, 1, 2), final_eval_tokens=2048,
                        **(dict(bpe, bpe_vocab_size=320) if scale == "gpu" else {}))  # fmt: skip
        rates, n = {o: (0.01,) for o in OPTIMIZERS}, 2 if scale == "cpu" else 1
        return dict(setup, pretrain=pretrain, sft=sft, pretrain_rates=rates, sft_rates=rates,
                    pretrain_seeds=PRETRAIN_SEEDS[:n], sft_seeds=SFT_SEEDS[:n])  # fmt: skip
    if scale == "cpu":
        return dict(setup, pretrain=dict(preset="tiny", model=sweep.dense_model(48, 2, 6), batch_size=16,
                                         seq_len=128, **_schedule(400, 20), eval_batches=8),
                    sft=dict(batch_size=16, seq_len=128, **_schedule(100, 10), eval_batches=4),
                    pretrain_rates={"adamw": (0.0178, 0.0316, 0.0562), "muon": (0.0316, 0.0562, 0.1)},
                    sft_rates={o: (5.62e-4, 1e-3, 1.78e-3) for o in OPTIMIZERS})  # fmt: skip
    if scale == "gpu":
        return dict(setup, pretrain=dict(preset="tiny", model=sweep.dense_model(256, 6, 4), batch_size=64,
                                         seq_len=512, **_schedule(3000, 200), eval_batches=8,
                                         bpe_vocab_size=8192, **bpe),
                    sft=dict(batch_size=64, seq_len=512, **_schedule(400, 40), eval_batches=8),
                    pretrain_rates={"adamw": (3.16e-3, 5.62e-3, 0.01), "muon": (5.62e-3, 0.01, 0.0178)},
                    sft_rates={o: (3.16e-4, 5.62e-4, 1e-3) for o in OPTIMIZERS})  # fmt: skip
    # pod: Moonlight-16B-A3B, 1.2T tokens of 2048 x 8K; micro-batches of one sequence a device
    steps = round(1.2e12 / (2048 * 8192))
    return dict(setup, pretrain=dict(preset="moonlight-16b-a3b", model={}, batch_size=2048,
                                     seq_len=8192, grad_accum=2048 // math.gcd(2048, devices),
                                     remat="full", **_schedule(steps, 2000), bpe_vocab_size=32768, **bpe),
                sft=dict(batch_size=128, seq_len=4096, grad_accum=128 // math.gcd(128, devices),
                         **_schedule(200, 20)),
                pretrain_rates={o: (4.2e-4,) for o in OPTIMIZERS}, pretrain_seeds=(0,),
                sft_rates={o: (2e-5,) for o in OPTIMIZERS})  # fmt: skip


def sft_fields(setup: dict, task: pathlib.Path, source: str | None) -> dict:
    """SFT fields: the pretrained model's, on the task's pairs, from `source`."""
    model = {k: v for k, v in setup["pretrain"].items() if k in MODEL_KEYS}
    return dict(setup["sft"], **model, init_from=source, data=(str(task / "sft.jsonl"),),
                data_format="sft-jsonl", validation_fraction=SFT_EVAL_FRACTION)  # fmt: skip


# --- the protocol ------------------------------------------------------------------------


def run_protocol(ledger, setup: dict, task: pathlib.Path, mesh=None) -> tuple[list, dict]:
    """Every run of the protocol (module docstring) and the chosen rates."""
    runs, chosen = [], {"pretrain": {}, "sft": {}}

    def train(fields: dict, name: str, **tags) -> dict:
        if fields.get("tokenizer") == "bpe" and "init_from" not in fields:
            fields = ledger.tokenized(fields)
        record = dict(ledger.train({**fields, "mesh": mesh}, name), **tags)
        runs.extend([] if any(r["key"] == record["key"] for r in runs) else [record])
        return record

    def tune(loss_at, start: tuple) -> float:
        losses = sweep.sweep_rates(loss_at, start, setup["extend"])
        if (best := sweep.best_rate(losses)) is None:
            raise SystemExit(f"every rate diverged: {sorted(losses)}")
        return best

    sources = {}
    for opt in OPTIMIZERS:

        def pretrain(lr, seed, opt=opt):
            fields = dict(setup["pretrain"], data=(str(task / "pretrain"),), optimizer=opt,
                          learning_rate=lr, seed=seed)  # fmt: skip
            return train(fields, f"pretrain {opt} lr {lr:g} seed {seed}", stage="pretrain",
                         optimizer=opt, learning_rate=lr, seed=seed)  # fmt: skip

        seeds = setup["pretrain_seeds"]
        losses = lambda lr: [pretrain(lr, s)["final_eval_loss"] for s in seeds]  # noqa: B023
        mean = lambda lr: None if None in (v := losses(lr)) else float(np.mean(v))  # noqa: B023
        lr = tune(mean, setup["pretrain_rates"][opt])
        chosen["pretrain"][opt] = lr
        sources[opt] = str(ledger.out / "runs" / pretrain(lr, seeds[0])["key"])
        # before SFT: one step at warmup's learning rate 0, so final_eval_loss is the model's
        before = dict(sft_fields(setup, task, sources[opt]), **_schedule(1, 1), optimizer="adamw",
                      learning_rate=1e-3)  # fmt: skip
        train(before, f"{LABELS[opt]}-pretrained before SFT", stage="before", pretrain=opt)
    for pre, sft in CELLS:

        def fine_tune(lr, seed, pre=pre, sft=sft):
            fields = dict(sft_fields(setup, task, sources[pre]), optimizer=sft, learning_rate=lr,
                          seed=seed)  # fmt: skip
            return train(fields, f"{cell_name(pre, sft)} lr {lr:g} sft seed {seed}", stage="sft",
                         pretrain=pre, optimizer=sft, learning_rate=lr, seed=seed)  # fmt: skip

        start = setup["sft_rates"][sft]
        one = len(start) == 1 and not setup["extend"]  # nothing to choose: no selection run
        select = lambda lr: fine_tune(lr, SELECT_SEED)["final_eval_loss"]  # noqa: B023
        lr = start[0] if one else tune(select, start)
        chosen["sft"][cell_name(pre, sft)] = lr
        for seed in setup["sft_seeds"]:
            fine_tune(lr, seed)
    return runs, chosen


# --- the analysis ------------------------------------------------------------------------


def _select(runs: list, **tags) -> list:
    return [r for r in runs if all(r.get(k) == v for k, v in tags.items())]


def _by_seed(runs: list, seeds, **tags) -> dict:
    return {r["seed"]: r["final_eval_loss"] for r in _select(runs, **tags)
            if r["seed"] in seeds and r["final_eval_loss"] is not None}  # fmt: skip


def judge(difference: sweep.Estimate, paper_sign: int | None) -> str | None:
    """sweep.verdict for a signed claim; for "no clear advantage" (0), not reproduced
    only when a is below b with 95% confidence; None: the paper makes no claim."""
    if paper_sign is None or difference.n < 2:
        return None if paper_sign is None else "inconclusive"
    if paper_sign:
        return sweep.verdict(difference, paper_sign)
    return "not reproduced" if sweep.verdict(difference, -1) == "reproduced" else "reproduced"


def analyse(runs: list, chosen: dict, pretrain_seeds, sft_seeds) -> dict:
    cells, comparisons, pretraining = {}, [], {}
    for pre, sft in CELLS:
        lr = chosen["sft"][cell_name(pre, sft)]
        seeds = _by_seed(runs, sft_seeds, stage="sft", pretrain=pre, optimizer=sft, learning_rate=lr)  # fmt: skip
        cells[cell_name(pre, sft)] = {"learning_rate": lr, "by_seed": seeds,
                                      "loss": sweep.estimate(seeds.values()).to_json()}  # fmt: skip
    for a, b, sign in COMPARISONS:
        d = sweep.paired(cells[a]["by_seed"], cells[b]["by_seed"])
        comparisons.append({"a": a, "b": b, "paper_sign": sign, "difference": d.to_json(),
                            "verdict": judge(d, sign)})  # fmt: skip
    for opt in OPTIMIZERS:
        lr = chosen["pretrain"][opt]
        seeds = _by_seed(runs, pretrain_seeds, stage="pretrain", optimizer=opt, learning_rate=lr)
        (before,) = _select(runs, stage="before", pretrain=opt)
        pretraining[opt] = {"learning_rate": lr, "by_seed": seeds, "before_sft": before["final_eval_loss"],
                            "loss": sweep.estimate(seeds.values()).to_json()}  # fmt: skip
    d = sweep.paired(pretraining["muon"]["by_seed"], pretraining["adamw"]["by_seed"])
    return {"cells": cells, "comparisons": comparisons, "pretraining": pretraining,
            "pretraining_muon_minus_adamw": {"difference": d.to_json(), "verdict": judge(d, -1)}}  # fmt: skip


# --- report ------------------------------------------------------------------------------


def _estimate(e: dict) -> sweep.Estimate:
    return sweep.Estimate(**{**e, "values": tuple(e["values"])})


def markdown(results: dict) -> str:
    a, row = results["analysis"], sweep.table_row
    lines = [row("pretrain + SFT", "held-out response loss (SFT seeds)", "SFT lr",
                 "paper MMLU / HumanEval / GSM8K"), row(*["---"] * 4)]  # fmt: skip
    for name, c in a["cells"].items():
        paper = " / ".join(str(v) for v in PAPER["table6"][name].values())
        lines.append(row(name, _estimate(c["loss"]), f"{c['learning_rate']:g}", paper))
    lines += ["", row("a - b (loss)", "paired over SFT seeds", "paper", "verdict"), row(*["---"] * 4)]  # fmt: skip
    for c in a["comparisons"]:
        paper = {-1: "a lower", 0: "no clear advantage", None: "no claim (mixed)"}[c["paper_sign"]]
        lines.append(row(f"{c['a']} - {c['b']}", _estimate(c["difference"]), paper, c["verdict"] or "-"))  # fmt: skip
    lines += ["", row("pretrained with", "lr", "final_eval_loss (pretraining seeds)",
                      "held-out response loss before SFT"), row(*["---"] * 4)]  # fmt: skip
    for opt, p in a["pretraining"].items():
        lines.append(row(LABELS[opt], f"{p['learning_rate']:g}", _estimate(p["loss"]), f"{p['before_sft']:.4f}"))  # fmt: skip
    d = a["pretraining_muon_minus_adamw"]
    lines.append(f"\npretraining Muon - AdamW: {_estimate(d['difference'])} (paper: lower): {d['verdict']}")  # fmt: skip
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
    a, runs = results["analysis"], results["runs"]
    fig, (cell_ax, sft_ax, pre_ax) = sweep.figure(1, 3, (16, 4.5))
    names = list(a["cells"])
    sweep.error_bars(cell_ax, range(4), [_estimate(a["cells"][n]["loss"]) for n in names], linestyle="none")  # fmt: skip
    cell_ax.set(xticks=range(4), xticklabels=names, ylabel="held-out response loss (mean ± 95%)",
                title="pretrain + SFT optimizer (Table 6's 2 x 2)")  # fmt: skip
    for (pre, sft), color in zip(CELLS, ("tab:purple", "tab:blue", "tab:orange", "tab:green")):
        pts = sorted((r["learning_rate"], r["final_eval_loss"]) for r in _select(
            runs, stage="sft", pretrain=pre, optimizer=sft, seed=SELECT_SEED) if r["final_eval_loss"])  # fmt: skip
        sft_ax.plot(*zip(*pts), "o-", color=color, label=cell_name(pre, sft)) if pts else None
    for opt, style in zip(OPTIMIZERS, ("-", "--")):
        sft_ax.axhline(a["pretraining"][opt]["before_sft"], color="0.5", ls=style, lw=1,
                       label=f"{LABELS[opt]}-pretrained, before SFT")  # fmt: skip
        rates = sorted({r["learning_rate"] for r in _select(runs, stage="pretrain", optimizer=opt)})
        seeds = [_by_seed(runs, results["pretrain_seeds"], stage="pretrain", optimizer=opt,
                          learning_rate=lr) for lr in rates]  # fmt: skip
        keep = [(lr, sweep.estimate(s.values())) for lr, s in zip(rates, seeds) if s]
        sweep.error_bars(pre_ax, *zip(*keep), label=LABELS[opt]) if keep else None
    sft_ax.set(xscale="log", xlabel="SFT learning rate", ylabel="held-out response loss",
               title=f"SFT rate sweeps (seed {SELECT_SEED})")  # fmt: skip
    pre_ax.set(xscale="log", xlabel="pretraining learning rate", ylabel="final eval loss",
               title="pretraining rate sweeps (seed means)")  # fmt: skip
    t = results["task"]
    sweep.save(
        fig,
        path,
        results,
        "Fine-tuning, Sec. 3.4",
        f"{t['sft_pairs']} SFT pairs, "
        f"{t['eval_pairs']} held-out pairs, from files held out of pretraining",
    )


# --- main --------------------------------------------------------------------------------


def configs(args, setup: dict) -> dict:
    """Pretraining and SFT's TrainConfig per optimizer (for --dry-run)."""
    from muonjax.train import TrainConfig

    task, out = pathlib.Path(args.out) / "task", {}
    for opt in OPTIMIZERS:
        out[f"pretrain-{opt}"] = TrainConfig(**setup["pretrain"], optimizer=opt, mesh=args.mesh,
                                             learning_rate=setup["pretrain_rates"][opt][0])  # fmt: skip
        out[f"sft-{opt}"] = TrainConfig(**sft_fields(setup, task, None), optimizer=opt,
                                        mesh=args.mesh, learning_rate=setup["sft_rates"][opt][0])  # fmt: skip
    return out


def train(args, ledger: sweep.Ledger, setup: dict) -> dict:
    """The task built once (by process 0), every run of the protocol, the analysis."""
    task = pathlib.Path(args.out) / "task"
    info = build_task(task, setup["site_packages"], args.quick) if ledger.lead else {}
    sweep.wait_for_lead("muonjax_finetune_task")
    runs, chosen = run_protocol(ledger, setup, task, args.mesh)
    return {"task": info, "pretrain_seeds": list(setup["pretrain_seeds"]),
            "select_seed": SELECT_SEED, "sft_seeds": list(setup["sft_seeds"]), "chosen": chosen,
            "runs": runs,
            "analysis": analyse(runs, chosen, setup["pretrain_seeds"], setup["sft_seeds"])}  # fmt: skip


FINDING = sweep.Finding(NAME, __doc__, PAPER, scale_setup, configs, train, markdown, plot)
main = FINDING.main

if __name__ == "__main__":
    FINDING.command()
