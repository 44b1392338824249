"""experiments/ns_dtype.py end to end at toy size: Muon with Newton-Schulz in
float32 and bfloat16 over two seeds, the per-dtype statistics, the paired
differences, the verdict's rule, README.md, and a restart that reuses every
recorded run instead of retraining it."""

import math

import numpy as np
import pytest
from conftest import load_experiment, run_experiment

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

ns_dtype = load_experiment("ns_dtype")


def test_quick_run_compares_the_dtypes_and_resumes(tmp_path):
    results = run_experiment("ns_dtype", tmp_path, "--quick")
    seeds = ns_dtype.seeds(quick=True)
    assert results["quick"] and results["complete"] and results["seeds"] == list(seeds)
    names = [ns_dtype.run_name(d, s) for s in seeds for d in ns_dtype.DTYPES]
    # (results.json's keys are sorted)
    assert sorted(results["runs"]) == sorted(names) and len(names) == 2 * len(seeds) >= 4
    assert results["reused_runs"] == []
    # a seed's two runs differ in the NS dtype only; seeds differ in the seed only
    for name in names:
        config = results["configs"][name]
        assert config == results["runs"][name]["config"]
        assert config["optimizer"] == "muon" and config["learning_rate"] == ns_dtype.LEARNING_RATE
        assert name == ns_dtype.run_name(config["ns_dtype"], config["seed"])
        other = results["configs"][names[0]]
        assert {k: v for k, v in config.items() if k not in ("ns_dtype", "seed")} == {
            k: v for k, v in other.items() if k not in ("ns_dtype", "seed")
        }
    for name, run in results["runs"].items():
        for metric in ns_dtype.METRICS:
            assert math.isfinite(run[metric]) and 0 < run[metric] < 10, (name, metric)
        assert run["skipped_steps"] == 0 and run["wall_time_s"] > 0
        assert run["train"]["loss"][-1] == run["train_loss"]
        assert run["train"]["step"][-1] == run["config"]["steps"]

    analysis = results["analysis"]
    assert set(analysis) == set(ns_dtype.METRICS)
    for metric, a in analysis.items():
        per = a["per_dtype"]
        for dtype in ns_dtype.DTYPES:
            values = [results["runs"][ns_dtype.run_name(dtype, s)][metric] for s in seeds]
            assert per[dtype]["values"] == values
            assert per[dtype]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert per[dtype]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
            assert math.isfinite(per[dtype]["std"]) and per[dtype]["std"] >= 0
        # the seeds change the run (initialization and data order)
        assert per["float32"]["std"] > 0, metric
        diff = per["bfloat16"]["mean"] - per["float32"]["mean"]
        assert a["diff_bf16_minus_f32"] == pytest.approx(diff, abs=1e-12)
        paired = [
            results["runs"][ns_dtype.run_name("bfloat16", s)][metric]
            - results["runs"][ns_dtype.run_name("float32", s)][metric]
            for s in seeds
        ]
        assert list(a["paired_diffs"]) == [str(s) for s in seeds]
        assert list(a["paired_diffs"].values()) == pytest.approx(paired, abs=1e-12)
        assert np.mean(paired) == pytest.approx(diff, abs=1e-9)
        assert a["paired_std"] == pytest.approx(np.std(paired, ddof=1), abs=1e-12)
        if a["paired_std"] > 0:
            t = np.mean(paired) / (np.std(paired, ddof=1) / math.sqrt(len(seeds)))
            assert a["paired_t"] == pytest.approx(t, rel=1e-9)
        assert a["t_95"] == ns_dtype.T_95[len(seeds) - 1]
        # the verdict's rule: within the larger per-dtype std
        threshold = max(per[d]["std"] for d in ns_dtype.DTYPES)
        assert a["threshold"] == threshold
        assert a["no_difference_beyond_seed_noise"] == (abs(diff) <= threshold)
        says_none = "no difference beyond seed noise" in a["verdict"]
        assert says_none == a["no_difference_beyond_seed_noise"], a["verdict"]
        assert f"{abs(diff):.4f}" in a["verdict"]
    assert results["verdict"] == analysis["eval_loss"]["verdict"]

    readme = (tmp_path / "README.md").read_text()
    assert "| eval loss |" in readme and "| train loss |" in readme
    assert all(analysis[m]["verdict"] in readme for m in ns_dtype.METRICS)
    assert f"{analysis['eval_loss']['per_dtype']['float32']['mean']:.4f}" in readme

    # a restart reuses every recorded run (same config) and reports the same numbers
    again = run_experiment("ns_dtype", tmp_path, "--quick")
    assert again["reused_runs"] == names
    for name in names:
        for metric in ns_dtype.METRICS:
            assert again["runs"][name][metric] == results["runs"][name][metric]
    assert again["analysis"] == analysis
