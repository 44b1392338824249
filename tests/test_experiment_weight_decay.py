"""experiments/weight_decay.py (paper Figure 2): growth, crossing and the paired
verdicts against values computed by hand; --quick end to end at every scale (the
ledger, the measurements from checkpoints, results.json, plot), a relaunch that
trains nothing, and --dry-run."""

import math

import numpy as np
import pytest
from conftest import dry_run_report, load_experiment, run_experiment, run_scale

from muonjax.models import param_counts
from muonjax.train import TrainConfig

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

wd = load_experiment("weight_decay")
STEPS = [10, 20, 30, 40]


def test_growth_is_log_end_over_half_way():
    assert wd.growth(STEPS, [1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.log(2))  # 4 / (step 20)
    assert wd.growth([0, 10, 20, 30, 40], [1, 1, 3, 3, 3]) == pytest.approx(0.0)
    assert wd.growth(STEPS, [1.0, 2.0, 2.0, 1.0]) < 0


def test_crossing_is_where_decay_stays_ahead():
    assert wd.crossing(STEPS, [-0.1, 0.02, -0.01, 0.03]) == 40  # ahead again at 20, not for good
    assert wd.crossing(STEPS, [-0.1, 0.02, 0.01, 0.03]) == 20
    assert wd.crossing(STEPS, [0.1, 0.02, 0.01, 0.03]) == 10
    assert wd.crossing(STEPS, [-0.1, 0.02, 0.01, -0.03]) is None


def _run(curve, seed, final, losses, weight, output=(1.0, 1.0, 1.0, 1.0), lr=0.0316):
    """A ledger record with the measurements: per checkpoint, 2 layers."""
    return dict(curve=curve, seed=seed, learning_rate=lr, status="done", final_eval_loss=final,
                fields={"steps": 40},
                series={"eval_step": STEPS, "eval_loss": list(losses), "log_step": STEPS,
                        "weight_rms": list(weight)},
                checkpoints={"step": STEPS, "weight_rms": [[w, w / 2] for w in weight],
                             "output_rms": [[o / 2, o] for o in output]})  # fmt: skip


def _runs():
    vanilla_loss = [3.0, 2.5, 2.3, 2.2]  # minus w/ wd: -0.05, -0.1, +0.05 (seed 2: -0.01), +0.1
    runs = []
    for seed, (late, grow) in enumerate(((0.05, 4.0), (0.06, 4.2), (0.055, 3.8))):
        wd_loss = [3.05, 2.6, 2.25 if seed < 2 else 2.31, 2.2 - late]
        runs += [_run("muon", seed, 2.2, vanilla_loss, [1.0, 2.0, 3.0, grow], [1, 2, 3, grow]),
                 _run("muon_wd", seed, 2.2 - late, wd_loss, [1.0, 2.0, 2.0, 2.0])]  # fmt: skip
    for lr, finals in ((0.01, (2.3, 2.32)), (0.0178, (2.25, 2.27)), (0.0316, (2.2, None))):
        for s, f in enumerate(finals):
            run = _run("adamw", s, f, [3] * 4, [1] * 4, lr=lr)
            runs.append(dict(run, status="done" if f else "diverged"))
    return runs


def test_analyse_pairs_seeds_and_picks_adamws_rate_on_seed_means():
    a = wd.analyse(_runs())
    assert a["adamw_rate"] == 0.0178  # 0.0316's seed 1 diverged: not a candidate
    late = a["claims"]["late"]["difference"]
    assert late["values"] == pytest.approx([0.05, 0.06, 0.055]) and late["n"] == 3
    # mean 0.055, std 0.005, 95%: 4.303 x 0.005 / sqrt(3)
    assert late["half_width"] == pytest.approx(4.303 * 0.005 / math.sqrt(3))
    assert a["claims"]["late"]["verdict"] == "reproduced"
    weight = a["claims"]["weight_rms"]["difference"]  # log(grow / 2) - log(2 / 2)
    assert weight["values"] == pytest.approx([math.log(2), math.log(2.1), math.log(1.9)])
    assert a["claims"]["weight_rms"]["verdict"] == "reproduced"
    assert a["claims"]["layer_output_rms"]["difference"]["values"] == pytest.approx(
        [math.log(2), math.log(2.1), math.log(1.9)]
    )
    vs = a["claims"]["vs_adamw"]["difference"]  # AdamW at 0.0178 - Muon w/ wd, seeds 0 and 1
    assert vs["values"] == pytest.approx([2.25 - 2.15, 2.27 - 2.14]) and vs["n"] == 2
    early = a["claims"]["early"]["difference"]  # the largest mean lead: step 20, -0.1 each seed
    assert a["early_lead_step"] == 20 and early["mean"] == pytest.approx(-0.1)
    assert a["claims"]["early"]["verdict"] == "reproduced"  # sign -1: vanilla ahead
    assert a["crossing"]["by_seed"] == {"0": 30, "1": 30, "2": 40}
    assert a["crossing"]["fraction"]["values"] == pytest.approx([0.75, 0.75, 1.0])
    assert a["curves"]["muon"]["end_weight_rms"] == pytest.approx([4.0, 2.0])
    assert a["curves"]["muon_wd"]["end_output_rms"] == pytest.approx([0.5, 1.0])
    table = wd.markdown({"analysis": a, "runs": _runs(), "setup": {"muon_lr": 0.0316}})
    assert "| reproduced |" in table and "0.0178: 2.26," in table and "0.0316: diverged" in table


def test_quick_cpu_end_to_end_and_resumed_from_its_ledger(tmp_path):
    results = run_experiment("weight_decay", tmp_path, "--quick")
    assert (tmp_path / "weight_decay.png").stat().st_size > 0
    runs = results["runs"]
    assert sorted((r["curve"], r["seed"]) for r in runs) == [
        ("adamw", 0), ("muon", 0), ("muon", 1), ("muon_wd", 0), ("muon_wd", 1)]  # fmt: skip
    for r in runs:
        f = r["fields"]
        assert f["schedule"] == "wsd" and f["model"]["first_k_dense"] == f["model"]["n_layers"] == 2
        assert f["weight_decay"] == (0.0 if r["curve"] == "muon" else 0.1)
        assert f.get("weight_decay_adamw", 0.1) == 0.1  # vanilla: Eq. 3's lambda alone differs
        s, c = r["series"], r["checkpoints"]
        assert len(s["eval_loss"]) == len(s["eval_step"]) >= 8 and np.all(
            np.isfinite(s["eval_loss"])
        )
        assert len(c["step"]) >= 4 and np.shape(c["weight_rms"]) == np.shape(c["output_rms"]) == (
            len(c["step"]), 2)  # fmt: skip
        assert np.min(c["weight_rms"]) > 0 and np.min(c["output_rms"]) > 0
    a = results["analysis"]
    assert a["claims"]["late"]["difference"]["n"] == 2
    assert all(c["verdict"] in ("reproduced", "not reproduced", "inconclusive")
               for c in a["claims"].values())  # fmt: skip
    assert results["setup"]["tokens"] == 24 * 8 * 32
    # relaunched, it trains nothing: every run comes from the ledger
    again = run_experiment("weight_decay", tmp_path, "--quick")
    assert again["runs"] == runs and again["training_time_s"] == results["training_time_s"]


@pytest.mark.parametrize("scale", ["gpu", "pod"])
def test_quick_gpu_and_pod_train_through_their_data_paths(tmp_path, scale):
    runs = run_scale("weight_decay", tmp_path, scale)["runs"]
    assert len(runs) == 3 and all(math.isfinite(r["final_eval_loss"]) for r in runs)
    assert all(len(r["checkpoints"]["output_rms"][-1]) == 2 for r in runs)


def test_dry_run_reports_each_curve(tmp_path):
    report = dry_run_report(wd, tmp_path)
    assert set(report) == set(wd.CURVES)
    assert all(r["config"]["schedule"] == "wsd" for r in report.values())


def test_pod_is_the_papers_setting():
    setup = wd.scale_setup("pod", quick=False, devices=8)
    c = TrainConfig(**wd.fields_of(setup, "muon", setup["muon_lr"], 0, None))
    assert param_counts(c.model_config())["total_non_embedding"] == pytest.approx(822e6, rel=0.01)
    assert c.steps * c.batch_size * c.seq_len == pytest.approx(100e9, rel=1e-3)
    assert c.learning_rate == setup["adamw"][0] == 8.825e-4
