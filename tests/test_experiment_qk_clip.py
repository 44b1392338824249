"""experiments/qk_clip.py: tau from the unclipped sweep, the paired analysis and
its verdicts against values computed by hand; --quick end to end at every scale
(the ledger, a relaunch that trains nothing, the overhead, results.json, the
plot), and --dry-run."""

import argparse
import math

import pytest
from conftest import dry_run_report, load_experiment, run_experiment, run_scale

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

qk = load_experiment("qk_clip")


class _Ledger:
    """Records what would be trained: the loss is least at lr 0.0316, the peak
    max logit 40 + 10 x seed without QK-Clip and tau with it."""

    def __init__(self):
        self.trained = []

    def tokenized(self, fields):
        return fields

    def train(self, fields, name, measure=None):
        lr, seed, tau = fields["learning_rate"], fields["seed"], fields["qk_clip"]
        self.trained.append((lr, seed, tau))
        loss = (math.log10(lr) + 1.5) ** 2 + seed + (0.001 if tau else 0.0)
        peak = tau if tau else 40.0 + 10 * seed
        return {"final_eval_loss": loss, "max_logit_peak": peak, "steps_clipping": 0.5}


def test_sweep_extends_then_clips_at_the_best_rate_at_half_its_peak(monkeypatch):
    monkeypatch.setattr(qk, "step_overhead", lambda config: {})  # timed in the quick run
    setup = qk.scale_setup("cpu", quick=False, devices=1)
    assert setup["start"] == (0.0178, 0.0316, 0.0562) and setup["tau"] is None
    ledger = _Ledger()
    done = qk.train(argparse.Namespace(mesh=None), ledger, setup)
    runs, tau = done["runs"], done["tau"]
    assert tau == 22.0  # half of the seed mean of 40 and 50
    assert sorted({lr for lr, _, t in ledger.trained if t is None}) == [0.0178, 0.0316, 0.0562]
    assert [(lr, s) for lr, s, t in ledger.trained if t] == [(0.0316, 0), (0.0316, 1)]
    a = qk.analyse(runs)
    assert a["learning_rate"] == 0.0316
    # peaks 22 - 40, 22 - 50: -18, -28; losses +0.001 each
    assert a["peak_clip_minus_plain"]["mean"] == pytest.approx(-23.0)
    assert a["peak_clip_minus_plain"]["half_width"] == pytest.approx(12.71 * 5)
    assert a["verdict_bounded"] == "inconclusive"  # -23 ± 63.6
    assert a["loss_clip_minus_plain"]["mean"] == pytest.approx(0.001)
    assert a["verdict_no_cost"] == "reproduced"  # ± 0: within the margin
    assert qk.scale_setup("pod", quick=False, devices=256)["tau"] == 100.0


@pytest.mark.parametrize(
    ("peaks", "losses", "bounded", "no_cost"),
    [
        ((-10, -11, -12), (0.05, 0.06, 0.07), "reproduced", "not reproduced"),
        ((5, 6, 7), (-0.001, 0.0, 0.001), "not reproduced", "reproduced"),
        ((-10, 10, 0), (0.0, 0.05, -0.05), "inconclusive", "inconclusive"),
    ],
)
def test_verdicts_read_the_paired_intervals(peaks, losses, bounded, no_cost):
    runs = []
    for seed, (dp, dl) in enumerate(zip(peaks, losses)):
        plain = dict(learning_rate=0.01, seed=seed, tau=None, final_eval_loss=2.0 + seed,
                     max_logit_peak=50.0 + seed, steps_clipping=None)  # fmt: skip
        runs += [plain, dict(plain, tau=25.0, final_eval_loss=plain["final_eval_loss"] + dl,
                             max_logit_peak=plain["max_logit_peak"] + dp, steps_clipping=1.0)]  # fmt: skip
    a = qk.analyse(runs)
    assert (a["verdict_bounded"], a["verdict_no_cost"]) == (bounded, no_cost)


def test_quick_cpu_end_to_end_and_resumed_from_its_ledger(tmp_path):
    results = run_experiment("qk_clip", tmp_path, "--quick")
    assert (tmp_path / "qk_clip.png").stat().st_size > 0
    runs, tau = results["runs"], results["tau"]
    plain = {r["seed"]: r for r in runs if r["tau"] is None}
    clipped = {r["seed"]: r for r in runs if r["tau"]}
    assert sorted(plain) == sorted(clipped) == results["seeds"] == [0, 1]
    assert tau == float(f"{sum(r['max_logit_peak'] for r in plain.values()) / 4:.2g}")
    for seed, r in clipped.items():
        assert r["fields"]["qk_clip"] == tau and plain[seed]["fields"]["qk_clip"] is None
        assert r["steps_clipping"] > 0 and r["max_logit_final"] < plain[seed]["max_logit_final"]
    assert results["analysis"]["peak_clip_minus_plain"]["n"] == 2
    o = results["overhead"]
    assert o["heads_clipped"] > 0 and o["ratio"] == o["step_s_with"] / o["step_s_without"]
    again = run_experiment("qk_clip", tmp_path, "--quick")  # trains nothing
    assert again["runs"] == runs and again["training_time_s"] == results["training_time_s"]


@pytest.mark.parametrize("scale", ["gpu", "pod"])
def test_quick_gpu_and_pod_train_through_their_data_paths(tmp_path, scale):
    runs = run_scale("qk_clip", tmp_path, scale)["runs"]
    assert len(runs) == 4 and sum(r["tau"] is not None for r in runs) == 2


def test_dry_run_reports_each_config(tmp_path):
    report = dry_run_report(qk, tmp_path)
    assert sorted(report) == ["muon-clip", "muon-plain"]
    assert report["muon-clip"]["config"]["qk_clip"] == 100.0
