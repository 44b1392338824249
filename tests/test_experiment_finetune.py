"""experiments/finetune.py (paper Sec. 3.4, Table 6): the SFT task's
prompt/response split, the held-out files, --quick end to end (2 pretraining
runs, the 2 x 2 of SFT runs, results.json, plot) and --scale pod --quick."""

import math

from conftest import load_experiment, run_experiment, run_pod_experiment

ft = load_experiment("finetune")

SOURCE = '''
import functools
import pytest

pytestmark = pytest.mark.slow  # trains, starts processes or runs an experiment: not in make test-fast

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
    pairs = ft.function_pairs(SOURCE)
    assert pairs == [
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


def test_quick_cpu_end_to_end(tmp_path):
    results = run_experiment("finetune", tmp_path, "--quick")
    assert (tmp_path / "finetune.png").stat().st_size > 0
    assert set(results["sft"]) == {"Muon+Muon", "Muon+AdamW", "AdamW+Muon", "AdamW+AdamW"}
    for name, cell in results["sft"].items():
        pre, sft = name.split("+")
        assert (ft.LABELS[cell["pretrain"]], ft.LABELS[cell["sft"]]) == (pre, sft)
        assert len(cell["runs"]) == len(results["sft_learning_rates"])
        assert math.isfinite(cell["eval_loss"])
        for run in cell["runs"].values():
            assert run["config"]["optimizer"] == cell["sft"]
            assert run["config"]["data_format"] == "sft-jsonl"
    task = results["task"]
    assert task["eval_pairs"] > 0 and task["sft_pairs"] > 0
    assert not set(task["eval_files"]) & set(task["sft_files"])
    for opt in ft.OPTIMIZERS:
        assert math.isfinite(results["pretrain"][opt]["sft_eval_loss_before_sft"])
    c = results["comparison"]
    assert c["best_cell"] in results["sft"]
    diff = results["sft"]["Muon+Muon"]["eval_loss"] - results["sft"]["Muon+AdamW"]["eval_loss"]
    assert c["muon_sft_minus_adamw_sft"]["Muon-pretrained"] == diff


def test_quick_pod_reports_each_config(tmp_path):
    pod = run_pod_experiment("finetune", tmp_path)["pod"]
    assert set(pod["runs"]) == {f"{w}-{o}" for w in ("pretrain", "sft") for o in ft.OPTIMIZERS}
    for name, r in pod["runs"].items():
        assert r["peak_bytes_per_device"] > 0 and r["run_flops"] > 0, name
        assert r["config"]["batch_size"] // r["config"]["grad_accum"] == 8  # data=8
