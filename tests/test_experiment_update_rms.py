"""experiments/update_rms.py (paper Table 1 and Table 8) end to end at toy size:
--quick trains every quick setting (the three rules, one more rms_scale, AdamW)
and writes results.json and the plot; --scale pod --quick builds and inspects
the shrunk pod configs."""

import math

import pytest
from conftest import load_experiment, run_experiment, run_pod_experiment

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

update_rms = load_experiment("update_rms")


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_cpu_writes_every_setting(tmp_path):
    results = run_experiment("update_rms", tmp_path, "--quick")
    assert (tmp_path / "update_rms.png").stat().st_size > 0
    quick = update_rms.settings(quick=True)
    assert set(results["runs"]) == set(quick)
    # AdamW's learning-rate sweep (one rate with --quick), then Muon at its best rate
    assert set(results["configs"]) == set(quick) - {"adamw"} | {
        f"adamw-lr{lr}" for lr in map(float, results["adamw_sweep"])
    }
    assert all(
        c["learning_rate"] == results["learning_rate"]
        for name, c in results["configs"].items()
        if name.startswith("muon")
    )
    assert len(results["runs"]) == 5
    for name, run in results["runs"].items():
        assert _finite(run["eval_loss"]) and _finite(run["train_loss"]), name
        assert _finite(run["wall_time_s"]) and _finite(run["last_learning_rate"]), name
        for key in ("weight_rms", "update_rms"):
            assert {"AttnQ", "AttnKV", "AttnO", "Dense"} <= set(run[key]), (name, key)
            assert all(_finite(v) and v > 0 for v in run[key].values()), (name, key)
    assert results["paper"]["table1"]["Adjusted LR"]["eval_loss"] == 2.789
    assert results["paper"]["table8"]["0.8"]["Dense_weight_rms"] == 8.73e-2
    assert _finite(results["wall_time_s"])
    runs = results["runs"]
    # Update Norm sets every matrix's update RMS to rms_scale exactly (Eq. 6)
    for group, value in runs["muon-update_norm"]["update_rms"].items():
        assert value == pytest.approx(0.2, rel=1e-3), group
    # Baseline (Eq. 5, sqrt(H)) gives the [H, 4H] MLP half the update RMS of
    # Adjusted LR (Eq. 7, sqrt(4H)); both agree on the square query
    base, adjusted = runs["muon-hidden"]["update_rms"], runs["muon-moonlight"]["update_rms"]
    assert base["Dense"] / adjusted["Dense"] == pytest.approx(0.5, rel=0.05)
    assert base["AttnQ"] / adjusted["AttnQ"] == pytest.approx(1.0, rel=0.05)
    # Adjusted LR's update RMS follows rms_scale (0.2 and 0.8 with --quick)
    scales = update_rms.rms_scales(quick=True)
    columns = list(update_rms.table8_columns(quick=True).values())[1:]
    assert len(scales) == len(columns) >= 2
    sweep = [runs[name]["update_rms"]["Dense"] / scale for scale, name in zip(scales, columns)]
    assert max(sweep) / min(sweep) == pytest.approx(1.0, rel=0.02)


def test_quick_pod_reports_each_config(tmp_path):
    pod = run_pod_experiment("update_rms", tmp_path)["pod"]
    assert set(pod["runs"]) == set(update_rms.settings(quick=True))
    for name, report in pod["runs"].items():
        assert report["parameters"]["total"] > 0, name
        assert report["flops_per_token"] > 0 and report["run_flops"] > 0, name
        assert report["peak_bytes_per_device"] > 0, name
        assert report["run_flops"] == report["flops_per_token"] * report["tokens"]
        assert report["model"]["first_k_dense"] == report["model"]["n_layers"]
        assert report["model"]["intermediate_size"] == 4 * report["model"]["d_model"]
