"""experiments/finetune.py (paper Sec. 3.4, Table 6): the SFT task's prompt/response
split and held-out files; the protocol's rate choices and seeds on a fake ledger;
the analysis against values computed by hand; --quick end to end at cpu (with a
relaunch that trains nothing) and at gpu and pod; --dry-run."""

import json
import math

import numpy as np
import pytest
import sweep
from conftest import dry_run_report, load_experiment, run_experiment, run_scale

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

ft = load_experiment("finetune")

SOURCE = '''
import functools

def no_docstring(x):
    return x

@functools.cache
def add(a,
        b=1):
    """Adds.

    Two lines."""
    c = a + b
    return c

class K:
    async def method(self):
        """Only a docstring."""

    def twice(self, x):
        """Twice x."""
        return 2 * x
'''


def test_function_pairs_split_signature_and_docstring_from_body():
    assert ft.function_pairs(SOURCE) == [
        ('def add(a,\n        b=1):\n    """Adds.\n\n    Two lines."""\n', "    c = a + b\n    return c\n"),
        ('def twice(self, x):\n    """Twice x."""\n', "    return 2 * x\n"),
    ]  # fmt: skip
    assert ft.function_pairs("def broken(:\n") == []


def test_held_out_files_are_a_fixed_fifth():
    from muonjax.train.corpus import stdlib_files

    root, files = stdlib_files()
    held = [f for f in files if ft.held_out(str(f.relative_to(root)))]
    assert 0.15 < len(held) / len(files) < 0.25
    assert held == [f for f in files if ft.held_out(str(f.relative_to(root)))]  # deterministic


class FakeLedger:
    """Ledger.train without training: final_eval_loss = loss(fields), keyed by fields."""

    def __init__(self, loss, tmp_path):
        self.loss, self.out, self.trained = loss, tmp_path, []

    def train(self, fields, name):
        self.trained += [] if fields in self.trained else [fields]
        return {"key": json.dumps(fields, sort_keys=True), "final_eval_loss": self.loss(fields),
                "wall_time_s": 1.0}  # fmt: skip


def test_protocol_tunes_both_stages_and_measures_on_other_seeds(tmp_path):
    setup = ft.scale_setup("cpu", quick=False, devices=1)

    def loss(f):  # pretraining: best at 0.1 for Muon (past the grid's edge), 0.0316 for AdamW
        if f.get("data_format") != "sft-jsonl":
            best = 0.1 if f["optimizer"] == "muon" else 0.0316
            return 3 + abs(math.log10(f["learning_rate"] / best)) + 0.01 * f.get("seed", 0)
        return 2 + abs(math.log10(f["learning_rate"] / 1e-3)) + 0.01 * f.get("seed", 0)

    ledger = FakeLedger(loss, tmp_path)
    runs, chosen = ft.run_protocol(ledger, setup, tmp_path / "task")
    assert chosen["pretrain"] == {"muon": 0.1, "adamw": 0.0316}
    assert chosen["sft"] == {name: 1e-3 for name in ("Muon+Muon", "Muon+AdamW", "AdamW+Muon", "AdamW+AdamW")}  # fmt: skip
    muon = {
        r["learning_rate"] for r in runs if r["stage"] == "pretrain" and r["optimizer"] == "muon"
    }
    assert muon == {0.0316, 0.0562, 0.1, 0.178}  # extended one past the edge, then inside
    for r in runs:
        if r["stage"] == "pretrain":  # every pretraining rate on both seeds
            assert sum(q["learning_rate"] == r["learning_rate"] and q["optimizer"] == r["optimizer"]
                       for q in runs if q["stage"] == "pretrain") == 2  # fmt: skip
    sft = [f for f in ledger.trained if f.get("data_format") == "sft-jsonl"]
    before = [f for f in sft if f["steps"] == 1]
    assert len(before) == 2 and all(f["warmup_steps"] == 1 for f in before)  # lr 0: unchanged
    # each cell: 3 rates picked on seed 0, then seeds 1, 2, 3 at the best; from the seed-0 model
    assert len(sft) == 2 + 4 * (3 + 3)
    for f in sft:
        pre = {str(tmp_path / "runs" / r["key"]) for r in runs if r["stage"] == "pretrain"
               and r["seed"] == 0 and r["learning_rate"] == chosen["pretrain"][r["optimizer"]]}  # fmt: skip
        assert f["init_from"] in pre and f["model"] == setup["pretrain"]["model"]
    measured = [r for r in runs if r["stage"] == "sft" and r["seed"] != ft.SELECT_SEED]
    assert len(measured) == 12 and {r["learning_rate"] for r in measured} == {1e-3}


def _runs(cells: dict, pretrain: dict, before: dict) -> list:
    runs = [dict(stage="sft", pretrain=pre, optimizer=sft, learning_rate=1e-3, seed=s,
                 final_eval_loss=v) for (pre, sft), losses in cells.items()
            for s, v in zip((1, 2, 3), losses)]  # fmt: skip
    runs += [dict(stage="pretrain", optimizer=o, learning_rate=0.01, seed=s, final_eval_loss=v)
             for o, losses in pretrain.items() for s, v in zip((0, 1), losses)]  # fmt: skip
    runs.append(
        dict(
            stage="sft",
            pretrain="muon",
            optimizer="muon",
            learning_rate=0.1,
            seed=0,
            final_eval_loss=0.5,
        )
    )  # a selection run at another rate: not measured
    return runs + [dict(stage="before", pretrain=o, final_eval_loss=v) for o, v in before.items()]


def test_analysis_pairs_cells_over_sft_seeds():
    cells = {("muon", "muon"): (1.0, 1.1, 1.2), ("muon", "adamw"): (1.1, 1.25, 1.3),
             ("adamw", "muon"): (1.2, 1.3, 1.4), ("adamw", "adamw"): (1.2, 1.1, 1.6)}  # fmt: skip
    runs = _runs(cells, {"muon": (2.0, 2.2), "adamw": (2.5, 2.6)}, {"muon": 3.0, "adamw": 3.5})
    chosen = {"pretrain": {"muon": 0.01, "adamw": 0.01}, "sft": dict.fromkeys(
        ("Muon+Muon", "Muon+AdamW", "AdamW+Muon", "AdamW+AdamW"), 1e-3)}  # fmt: skip
    a = ft.analyse(runs, chosen, (0, 1), (1, 2, 3))
    assert a["cells"]["Muon+Muon"]["loss"]["mean"] == pytest.approx(1.1)
    assert a["cells"]["Muon+Muon"]["loss"]["n"] == 3  # the seed-0 selection run left out
    c = {(x["a"], x["b"]): x for x in a["comparisons"]}
    d = c["Muon+Muon", "Muon+AdamW"]["difference"]  # -0.1, -0.15, -0.1
    assert d["mean"] == pytest.approx(-0.35 / 3)
    half = 4.303 * np.std([-0.1, -0.15, -0.1], ddof=1) / math.sqrt(3)
    assert d["half_width"] == pytest.approx(half) and half < 0.35 / 3
    assert c["Muon+Muon", "Muon+AdamW"]["verdict"] == "reproduced"
    assert c["Muon+Muon", "AdamW+Muon"]["verdict"] == "reproduced"  # -0.2, -0.2, -0.2
    assert c["Muon+Muon", "AdamW+AdamW"]["verdict"] == "inconclusive"  # -0.2, 0, -0.4
    assert c["AdamW+Muon", "AdamW+AdamW"]["verdict"] == "reproduced"  # no clear Muon-SFT gain
    assert c["Muon+AdamW", "AdamW+AdamW"]["verdict"] is None  # no paper claim
    p = a["pretraining"]
    assert p["muon"]["before_sft"] == 3.0 and p["adamw"]["loss"]["mean"] == pytest.approx(2.55)
    assert a["pretraining_muon_minus_adamw"]["difference"]["mean"] == pytest.approx(-0.45)


def test_judge_no_clear_advantage():
    below = sweep.estimate([-0.3, -0.31, -0.29])  # Muon-SFT clearly lower
    assert ft.judge(below, 0) == "not reproduced" and ft.judge(below, -1) == "reproduced"
    assert ft.judge(sweep.estimate([0.3, 0.31, 0.29]), 0) == "reproduced"
    assert ft.judge(sweep.estimate([0.1]), 0) == "inconclusive"


def test_quick_cpu_end_to_end_and_resumed_from_its_ledger(tmp_path):
    results = run_experiment("finetune", tmp_path, "--quick")
    assert (tmp_path / "finetune.png").stat().st_size > 0
    runs, task = results["runs"], results["task"]
    assert len(runs) == 2 * 2 + 2 + 4 * 2  # pretraining x seeds, before SFT, cells x SFT seeds
    assert all(math.isfinite(r["final_eval_loss"]) for r in runs)
    assert task["eval_pairs"] > 0 and task["sft_pairs"] > 0
    for r in runs:
        sft = r["stage"] != "pretrain"
        assert (r["fields"].get("data_format") == "sft-jsonl") == sft
        assert (r["fields"].get("init_from") is not None) == sft
    for name, cell in results["analysis"]["cells"].items():
        assert sorted(cell["by_seed"]) == ["1", "2"] and cell["loss"]["n"] == 2, name
    # before SFT: one step at learning rate 0 leaves the pretrained parameters unchanged
    import jax
    from sweep import params_at

    before = next(r for r in runs if r["stage"] == "before")
    same = jax.tree.map(np.array_equal, params_at(tmp_path / "runs" / before["key"], 1),
                        params_at(before["fields"]["init_from"]))  # fmt: skip
    assert all(jax.tree.leaves(same))
    # relaunched, it trains nothing: every run comes from the ledger
    again = run_experiment("finetune", tmp_path, "--quick")
    assert again["runs"] == runs and again["training_time_s"] == results["training_time_s"]


@pytest.mark.parametrize("scale", ["gpu", "pod"])
def test_quick_gpu_and_pod_train_through_their_data_paths(tmp_path, scale):
    runs = run_scale("finetune", tmp_path, scale)["runs"]
    assert len(runs) == 8 and all(math.isfinite(r["final_eval_loss"]) for r in runs)


def test_dry_run_reports_each_config(tmp_path):
    report = dry_run_report(ft, tmp_path)
    assert sorted(report) == ["pretrain-adamw", "pretrain-muon", "sft-adamw", "sft-muon"]


def test_pod_is_the_papers_setting():
    setup = ft.scale_setup("pod", quick=False, devices=256)
    p, s = setup["pretrain"], setup["sft"]
    assert p["preset"] == "moonlight-16b-a3b" and p["batch_size"] * p["seq_len"] == 2048 * 8192
    assert p["steps"] * 2048 * 8192 == pytest.approx(1.2e12, rel=1e-4)
    assert p["batch_size"] // p["grad_accum"] == 256 and s["batch_size"] // s["grad_accum"] == 128
    assert setup["sft_seeds"] == ft.SFT_SEEDS and len(ft.SFT_SEEDS) == 3
