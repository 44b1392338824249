"""experiments/weight_decay.py (paper Figure 2) end to end at toy size: --quick
trains AdamW, Muon without and with weight decay and writes results.json and the
plot; --scale pod --quick builds and inspects the shrunk pod configs."""

import json
import math

import pytest
from conftest import load_experiment, run_experiment, run_pod_experiment

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

weight_decay = load_experiment("weight_decay")


def _finite(xs):
    xs = xs if isinstance(xs, list) else [xs]
    return len(xs) > 0 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def test_quick_cpu_writes_curves_and_plot(tmp_path):
    results = run_experiment("weight_decay", tmp_path, "--quick")
    assert (tmp_path / "weight_decay.png").stat().st_size > 0
    assert set(results["runs"]) == set(weight_decay.RUNS) == set(results["configs"])
    configs = results["configs"]
    # one learning rate, schedule and token count; only the decay and the optimizer differ
    for key in ("learning_rate", "schedule", "steps", "batch_size", "seq_len", "model"):
        assert len({json.dumps(c[key], sort_keys=True) for c in configs.values()}) == 1, key
    assert configs["muon"]["weight_decay"] == 0 and configs["muon"]["weight_decay_adamw"] == 0.1
    assert configs["muon_wd"]["weight_decay"] == configs["adamw"]["weight_decay"] == 0.1
    for name, run in results["runs"].items():
        evals = run["eval"]
        assert len(evals["eval_loss"]) >= 8 and _finite(evals["eval_loss"]), name
        assert evals["tokens"] == results["comparison"]["tokens"], name
        for key in ("loss", "weight_rms_muon", "weight_rms_adamw"):
            assert _finite(run["train"][key]) and len(run["train"][key]) == len(
                run["train"]["tokens"]
            )
        layers = run["layer_output_rms"]
        assert len(layers["step"]) >= 2 and all(len(x) == 2 for x in layers["per_layer"]), name
        assert _finite(layers["max"]) and min(layers["max"]) > 0, name
        assert _finite(list(run["final"].values())) and _finite(run["wall_time_s"]), name
    c = results["comparison"]
    assert _finite(c["vanilla_minus_wd"]) and _finite(c["adamw_minus_muon_wd"])
    runs = results["runs"]
    diff = runs["muon"]["eval"]["eval_loss"][-1] - runs["muon_wd"]["eval"]["eval_loss"][-1]
    assert c["final_vanilla_minus_wd"] == pytest.approx(diff)
    assert results["paper"]["inset"]["vanilla_wins"] == pytest.approx(
        {"by": 0.023, "iteration": 24000, "tokens": 24000 * 160 * 8192}
    )
    assert set(results["paper"]["claims"]) >= {"early", "late", "vs_adamw", "weight_rms_without_wd"}
    assert results["setup"]["tokens"] == configs["muon"]["steps"] * 8 * 32
    assert _finite(results["wall_time_s"])


def test_compare_finds_the_crossover():
    tokens = [1, 2, 3, 4, 5]
    runs = {
        "muon": {"eval": {"tokens": tokens, "eval_loss": [3.0, 2.5, 2.2, 2.1, 2.05]}},
        "muon_wd": {"eval": {"tokens": tokens, "eval_loss": [3.1, 2.6, 2.15, 2.12, 2.0]}},
        "adamw": {"eval": {"tokens": tokens, "eval_loss": [2.9, 2.7, 2.3, 2.2, 2.1]}},
    }
    c = weight_decay.compare(runs)
    assert c["vanilla_wins"] == pytest.approx({"by": 0.1, "tokens": 1})
    assert c["muon_wd_wins"] == pytest.approx({"by": 0.05, "tokens": 3})
    assert c["vanilla_last_ahead_tokens"] == 4  # ahead again at 4 after falling behind at 3
    assert c["muon_wd_ahead_for_good_from_tokens"] == 5
    assert c["muon_wd_ahead_of_adamw_for_good_from_tokens"] == 2
    assert c["vanilla_ahead_fraction_of_evals"] == pytest.approx(0.6)


def test_quick_pod_reports_each_config(tmp_path):
    pod = run_pod_experiment("weight_decay", tmp_path)["pod"]
    assert set(pod["runs"]) == set(weight_decay.RUNS)
    for name, report in pod["runs"].items():
        assert report["parameters"]["total_non_embedding"] > 0, name
        assert report["flops_per_token"] > 0 and report["run_flops"] > 0, name
        assert report["peak_bytes_per_device"] > 0, name
        assert report["run_flops"] == report["flops_per_token"] * report["tokens"]
        assert report["model"]["first_k_dense"] == report["model"]["n_layers"]
        c = report["config"]
        assert c["batch_size"] // c["grad_accum"] == 8  # one sequence per device of data=8
    assert pod["runs"]["muon"]["config"]["weight_decay"] == 0
    assert pod["vocab_size"] > 0 and pod["vocab_assumption"]
