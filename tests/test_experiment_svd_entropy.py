"""experiments/svd_entropy.py (paper Figure 4) end to end at toy size: --quick
trains Muon and AdamW on the same tokens and writes results.json and the plot;
--scale pod --quick builds and inspects the shrunk pod configs."""

import json
import math

import pytest
from conftest import load_experiment, run_experiment, run_pod_experiment

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

svd_entropy = load_experiment("svd_entropy")


def _entropies(xs):
    return len(xs) > 0 and all(isinstance(x, float) and 0 <= x <= 1 for x in xs)


def test_quick_cpu_writes_curves_and_plot(tmp_path):
    results = run_experiment("svd_entropy", tmp_path, "--quick")
    assert (tmp_path / "svd_entropy.png").stat().st_size > 0
    names = {"adamw_lr0.01", "muon_lr0.01"}
    assert set(results["runs"]) == set(results["configs"]) == names
    configs = results["configs"]
    # the same tokens, schedule and learning rate; only the optimizer differs
    for key in ("learning_rate", "schedule", "steps", "batch_size", "seq_len", "model", "seed"):
        assert len({json.dumps(c[key], sort_keys=True) for c in configs.values()}) == 1, key
    assert {c["optimizer"] for c in configs.values()} == {"muon", "adamw"}
    assert all(c["adam_b1"] == 0.9 and c["adam_b2"] == 0.95 for c in configs.values())
    groups = svd_entropy.GROUPS
    for name, run in results["runs"].items():
        curves = run["svd_entropy"]
        assert curves["step"] == [0, 2, 4, 6, 8], name  # --svd-entropy-every 2
        assert all(_entropies(curves[g]) and len(curves[g]) == 5 for g in groups), name
        assert {g: curves[g][0] for g in groups} == results["initial"], name  # the same init
        per_matrix = run["per_matrix"]
        assert per_matrix["step"] == [4, 8], name  # every checkpoint
        assert all(_entropies(svd_entropy._flat(e).tolist()) for e in per_matrix["entropy"])
        assert math.isfinite(run["final"]["eval_loss"]) and run["wall_time_s"] > 0
    # 2 layers (1 dense, 1 MoE of 4 experts): 2 x (q, o), 2 x (kv_a, kv_b), 4 x 3, 3, 1, 3
    assert results["setup"]["matrices"] == 4 + 4 + 12 + 3 + 1 + 3
    assert results["main_learning_rate"] == 0.01
    c = results["comparison"]["0.01"]
    assert set(c["final_gap"]) == set(groups) and c["largest_final_gap"] in groups
    pm = c["per_matrix"]
    assert 0 <= pm["final_muon_higher_fraction"] <= 1 and pm["matrices"] == 27
    assert len(svd_entropy.claims(results)) == 3 and "| claim |" in svd_entropy.markdown(results)
    assert results["paper"]["per_matrix_fraction"] == 0.9
    assert math.isfinite(results["wall_time_s"])


def test_compare_pairs_matrices_and_groups():
    """Muon above AdamW in every group but the router's last step (step 0, the
    shared initialization, does not count); 3 of 4 matrices higher."""

    def run(entropy, per_matrix):
        curves = {g: [0.95, *entropy] for g in svd_entropy.GROUPS}
        return {
            "svd_entropy": {"step": [0, 1, 2], **curves},
            "per_matrix": {"step": [2], "entropy": [per_matrix]},
            "final": {"eval_loss": 1.0},
        }

    runs = {
        "muon_lr0.01": run([0.9, 0.9], {"moe/router/kernel": [0.9], "moe/experts/up": [0.8, 0.7, 0.6]}),
        "adamw_lr0.01": run([0.5, 0.6], {"moe/router/kernel": [0.95], "moe/experts/up": [0.5, 0.5, 0.5]}),
    }  # fmt: skip
    runs["muon_lr0.01"]["svd_entropy"]["Router"] = [0.95, 0.95, 0.55]
    c = svd_entropy.compare(runs, 0.01)
    assert c["muon_minus_adamw"]["AttnQO"] == pytest.approx([0, 0.4, 0.3])
    assert c["smallest_gap"]["AttnQO"] == pytest.approx(0.3)
    assert c["mean_gap"]["AttnQO"] == pytest.approx(0.35)
    assert not c["muon_higher_everywhere"]  # the router's last step
    assert c["muon_higher_fraction_of_steps"] == {g: 1.0 for g in svd_entropy.GROUPS} | {
        "Router": 0.5
    }
    assert c["largest_final_gap"] == "AttnQO"  # ties: the first in Figure 4's order
    assert c["per_matrix"]["final_muon_higher_fraction"] == 0.75
    assert c["per_matrix"]["final_by_group"] == {"Experts": 1.0, "Router": 0.0}
    runs["muon_lr0.01"]["svd_entropy"]["Router"] = [0.95, 0.95, 0.65]
    assert svd_entropy.compare(runs, 0.01)["muon_higher_everywhere"]


def test_quick_pod_reports_each_config(tmp_path):
    pod = run_pod_experiment("svd_entropy", tmp_path)["pod"]
    assert set(pod["runs"]) == {"muon", "adamw"}
    for name, report in pod["runs"].items():
        assert report["parameters"]["total_non_embedding"] > 0, name
        assert report["flops_per_token"] > 0 and report["peak_bytes_per_device"] > 0, name
        assert report["run_flops"] == report["flops_per_token"] * report["tokens"]
        c = report["config"]
        assert c["optimizer"] == name and c["learning_rate"] == 4.2e-4
        assert c["batch_size"] // c["grad_accum"] == 8  # one sequence per device of data=8
        assert c["svd_entropy_every"] > 0
    metric = pod["svd_entropy_metric"]
    model = pod["runs"]["muon"]["model"]
    moe_layers = model["n_layers"] - model["first_k_dense"]
    assert metric["matrices"]["Experts"] == moe_layers * model["n_routed_experts"] * 3
    assert metric["matrices"]["Router"] == moe_layers
    assert 0 < metric["fraction_of_training_flops"] < 1 and metric["measurements"] == 5
