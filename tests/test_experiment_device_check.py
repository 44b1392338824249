"""experiments/device_check.py at tiny sizes on the CPU, so that the script an
accelerator runs stays alive: every section runs without error and reports
consistent numbers."""

import pytest
from conftest import run_experiment

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow


GOALS = {"moe_1b_adamw_mfu", "moe_1b_muon_mfu", "moe_1b_muon_accum8_over_adamw_accum8",
         "dense_822m_adamw_mfu", "ns_bf16_over_matmul_min", "muon_over_optax_contrib"}  # fmt: skip


def test_quick_device_check_runs_every_section(tmp_path):
    results = run_experiment("device_check", tmp_path, "--quick")
    assert results["errors"] == {} and results["quick"] is True
    sections = {"matmul", "newton_schulz", "optax_contrib", "dispatch", "attention", "train_step"}
    assert sections | {"profile"} <= set(results)
    for dtype in ("float32", "bfloat16"):
        assert results["matmul"][dtype]["tflop_per_s"] > 0
        sv = results["newton_schulz"][f"singular_values_{dtype}"]
        assert 0.6 < sv["min"] <= sv["max"] < 1.25, (dtype, sv)  # Jordan's band, about [0.7, 1.2]
    # every dispatch equals blocks in bfloat16, forward and backward (2^-8 roundings)
    d = results["dispatch"]
    assert set(d["seconds"]) == {"blocks", "ragged_dot", "tiles"}
    for method in d["seconds"]:
        assert (
            d["output_rel_diff"][method] < 1e-2 and max(d["grad_rel_diff"][method].values()) < 1e-2
        )
    assert results["attention"]["seconds"]["xla"] > 0  # cuDNN's only on a GPU
    for row in results["train_step"].values():
        for key in set(row) & {"muon", "adamw", "muon_blocks", "muon_tiles"}:
            step = row[key]
            assert step["seconds"] > 0 and 0 < step["mfu_vs_measured_bf16_matmul"]
            assert step["tokens_per_s"] == row["batch_size"] * row["seq_len"] / step["seconds"]
    one_b = results["train_step"]["1b"]
    assert one_b["muon_over_adamw"] == one_b["muon"]["seconds"] / one_b["adamw"]["seconds"]
    assert one_b["dtype"] == "bfloat16" and results["train_step"]["1b_accum8"]["grad_accum"] > 1
    # each goal is a number of this run, taken from its section
    goals = results["goals"]
    assert set(goals) == GOALS and all(isinstance(v, float) and v > 0 for v in goals.values())
    assert goals["moe_1b_muon_mfu"] == one_b["muon"]["mfu_vs_measured_bf16_matmul"]
    ns = [r["bfloat16"]["of_matmul"] for r in results["newton_schulz"]["shapes"]]
    assert goals["ns_bf16_over_matmul_min"] == min(ns)
    top = (tmp_path / "profile.txt").read_text().splitlines()
    assert top[0].startswith("top 15 of") and len(top) == 16
