"""experiments/device_check.py at tiny sizes on the CPU, so that the script an
accelerator runs stays alive: every section runs without error and reports
consistent numbers."""

import pytest
from conftest import run_experiment

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow


def test_quick_device_check_runs_every_section(tmp_path):
    results = run_experiment("device_check", tmp_path, "--quick")
    assert results["errors"] == {} and results["quick"] is True
    assert {"matmul", "newton_schulz", "optax_contrib", "dispatch", "train_step"} <= set(results)
    for dtype in ("float32", "bfloat16"):
        assert results["matmul"][dtype]["tflop_per_s"] > 0
        sv = results["newton_schulz"][f"singular_values_{dtype}"]
        assert 0.6 < sv["min"] <= sv["max"] < 1.25, (dtype, sv)  # Jordan's band, about [0.7, 1.2]
    # the accelerator's expert dispatch equals the CPU's, forward and backward
    d = results["dispatch"]
    assert d["output_rel_diff"] < 1e-5 and max(d["grad_rel_diff"].values()) < 1e-5
    for row in results["train_step"].values():
        for optimizer in ("muon", "adamw"):
            step = row[optimizer]
            assert step["seconds"] > 0 and 0 < step["mfu_vs_measured_bf16_matmul"]
            assert step["tokens_per_s"] == row["batch_size"] * row["seq_len"] / step["seconds"]
        assert row["muon_over_adamw"] == row["muon"]["seconds"] / row["adamw"]["seconds"]
    assert results["train_step"]["1b"]["dtype"] == "bfloat16"
