"""experiments/attention_logits.py (paper App. D, Figure 7) end to end at toy
size: --quick trains Muon and AdamW with MLA and writes results.json and the
plot; --scale pod --quick builds and inspects a shrunk pod config per optimizer
and per attention."""

import json
import math

import numpy as np
import pytest
from conftest import load_experiment, run_experiment, run_pod_experiment

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

attention_logits = load_experiment("attention_logits")


def _finite(xs):
    xs = np.asarray(xs, float)
    return xs.size > 0 and bool(np.all(np.isfinite(xs)))


def test_quick_cpu_writes_curves_and_plot(tmp_path):
    results = run_experiment("attention_logits", tmp_path, "--quick")
    assert (tmp_path / "attention_logits.png").stat().st_size > 0
    quick = attention_logits.QUICK_RUNS
    assert set(results["runs"]) == set(quick) == set(results["configs"])
    assert {attention_logits.RUNS[n][1] for n in quick} == {"muon", "adamw"}
    configs = results["configs"]
    # one model shape, data, schedule and threshold; only the optimizer and the attention differ
    for key in ("learning_rate", "schedule", "steps", "batch_size", "seq_len", "weight_decay",
                "large_logit_threshold", "adam_b1", "adam_b2"):  # fmt: skip
        assert len({json.dumps(c[key]) for c in configs.values()}) == 1, key
    assert configs["adamw_mla"]["adam_b2"] == 0.95
    for name in quick:
        _, optimizer, attention = attention_logits.RUNS[name]
        assert configs[name]["optimizer"] == optimizer
        assert configs[name]["model"]["attention"] == attention
    threshold = results["setup"]["threshold"]
    n_layers = configs["muon_mla"]["model"]["n_layers"]
    for name, run in results["runs"].items():
        train, final = run["train"], run["final"]
        per_layer = np.asarray(train["max_attention_logit_per_layer"])
        assert per_layer.shape == (len(train["step"]), n_layers) and _finite(per_layer), name
        np.testing.assert_allclose(per_layer.max(1), train["max_attention_logit"], rtol=1e-6)
        ratio = np.asarray(train["large_attention_logit_ratio_per_layer"])
        assert ratio.shape == per_layer.shape and np.all((ratio >= 0) & (ratio <= 1)), name
        # a layer with logits above the threshold has a max above it, and back
        assert np.array_equal(ratio > 0, per_layer > threshold), name
        np.testing.assert_allclose(ratio.mean(1), train["large_attention_logit_ratio"], rtol=1e-5)
        assert final["max_logit_peak"] == per_layer.max()
        assert final["max_logit_final_per_layer"] == per_layer[-1].tolist()
        assert len(run["eval"]["eval_loss"]) >= 2 and _finite(run["eval"]["eval_loss"]), name
        assert math.isfinite(final["eval_loss"]) and run["wall_time_s"] > 0
    # the quick threshold is low enough that some logits cross it
    assert any(r["final"]["ratio_peak"] > 0 for r in results["runs"].values())
    assert results["paper"]["threshold"] == 100 and results["paper"]["ratio"] == 1e-4
    assert len(attention_logits.claims(results)) == 4
    assert results["setup"]["tokens"] == configs["muon_mla"]["steps"] * 8 * 32


def test_quick_pod_reports_each_config(tmp_path):
    pod = run_pod_experiment("attention_logits", tmp_path)["pod"]
    assert set(pod["runs"]) == set(attention_logits.QUICK_POD_RUNS)
    kinds = [attention_logits.RUNS[n][1:] for n in pod["runs"]]
    assert {o for o, _ in kinds} == {"muon", "adamw"} and {a for _, a in kinds} == {"mla", "mha"}
    for name, report in pod["runs"].items():
        _, optimizer, attention = attention_logits.RUNS[name]
        assert report["config"]["optimizer"] == optimizer
        assert report["model"]["attention"] == attention
        assert report["parameters"]["total_non_embedding"] > 0, name
        assert report["flops_per_token"] > 0 and report["peak_bytes_per_device"] > 0, name
        assert report["run_flops"] == report["flops_per_token"] * report["tokens"]
        c = report["config"]
        assert c["batch_size"] // c["grad_accum"] == 8  # one sequence per device of data=8
        assert c["learning_rate"] == 4.2e-4 and c["large_logit_threshold"] == 100
