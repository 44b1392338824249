"""experiments/attention_logits.py (paper App. D, Figure 7): the per-run measures
and the analysis against values computed by hand; --quick end to end at every
scale (sweep, seeds, the ledger, results.json, plot), a relaunch that trains
nothing, and --dry-run."""

import argparse
import json
import math

import numpy as np
import pytest
from conftest import dry_run_report, load_experiment, run_experiment, run_scale

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

al = load_experiment("attention_logits")


def test_measure_reads_peak_final_and_ratio_from_metrics(tmp_path):
    lines = [{"step": 0, "eval_loss": 5.0}]
    per_layer = [[1.0, 2.0], [7.0, 3.0], [4.0, 9.0], [5.0, 6.0], [2.0, 8.0]]
    for step, (logits, ratio) in enumerate(zip(per_layer, [0, 0.1, 0.3, 0.2, 0.05])):
        lines.append({"step": step * 10, "loss": 3.0, "max_attention_logit_per_layer": logits,
                      "large_attention_logit_ratio": ratio})  # fmt: skip
    lines.append({**lines[3], "max_attention_logit_per_layer": [1.0, 1.0]})  # resumed: kept
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    m = al.measure(tmp_path, None)
    assert m["max_logit_peak"] == 8.0 and m["max_logit_peak_step"] == 40  # step 20 rewritten
    assert m["max_logit_peak_layer"] == 1 and m["max_logit_final"] == 8.0
    assert m["ratio_peak"] == 0.3 and m["ratio_final"] == 0.05
    assert m["curve"]["step"] == [0, 10, 20, 30, 40]  # fewer points than CURVE_POINTS: all
    assert m["curve"]["max_logit_per_layer"][2] == [1.0, 1.0]


def _run(att, opt, lr, seed, loss, peak=None):
    """A ledger record; a diverged run (loss None) has no measures."""
    r = dict(attention=att, optimizer=opt, learning_rate=lr, seed=seed, final_eval_loss=loss)
    return r if loss is None else dict(r, max_logit_peak=peak, max_logit_final=peak / 2,
                                       ratio_peak=0.0)  # fmt: skip


def test_analysis_compares_at_best_loss_and_at_matched_rates():
    runs = [
        _run("mla", "adamw", 0.01, 0, 3.0, 20.0), _run("mla", "adamw", 0.01, 1, 3.2, 30.0),
        _run("mla", "adamw", 0.0178, 0, 2.9, 50.0), _run("mla", "adamw", 0.0178, 1, 3.0, 70.0),
        _run("mla", "adamw", 0.0316, 0, 2.5, 90.0), _run("mla", "adamw", 0.0316, 1, None),
        _run("mla", "muon", 0.0178, 0, 2.6, 40.0), _run("mla", "muon", 0.0178, 1, 2.7, 40.0),
        _run("mla", "muon", 0.0316, 0, 2.5, 60.0), _run("mla", "muon", 0.0316, 1, 2.6, 100.0),
    ]  # fmt: skip
    a = al.analyse(runs, seeds=(0, 1))["mla"]
    # AdamW's 0.0316 lost a seed: not a candidate, whatever its other seed's loss (2.5)
    assert a["best_rate"] == {"adamw": 0.0178, "muon": 0.0316}
    best = a["at_best_rates"]
    # Muon 0.0316 (60, 100) - AdamW 0.0178 (50, 70), paired by seed: 10, 30
    d = best["muon_minus_adamw"]
    assert d["mean"] == pytest.approx(20.0) and d["std"] == pytest.approx(math.sqrt(200))
    assert d["half_width"] == pytest.approx(12.71 * math.sqrt(200) / math.sqrt(2))
    assert best["verdict"] == "inconclusive"  # 20 ± 127
    (matched,) = a["at_matched_rates"]  # 0.0178: Muon (40, 40) - AdamW (50, 70) = -10, -30
    assert matched["rates"] == {"adamw": 0.0178, "muon": 0.0178}
    assert matched["muon_minus_adamw"]["mean"] == pytest.approx(-20.0)
    points = {p["learning_rate"]: p for p in a["sweeps"]["adamw"]}
    assert points[0.0316]["seeds"] == 1 and points[0.01]["max_logit_peak"]["mean"] == 25.0
    table = al.markdown({"analysis": {"mla": a}, "threshold": 100.0})
    assert "| mla | muon | 0.0316 (best) | 2.5500 ± 0.6355 | 80 ± 254 |" in table
    assert (
        "| mla | 0.0316 / 0.0178 (best-loss) | +20.0000 ± 127.1000 (n=2) | inconclusive |" in table
    )


def test_verdict_reads_the_paired_sign():
    runs = [_run("mha", o, 0.01, s, 2.0, p + (100.0 if o == "muon" else 0.0) + s)
            for o in ("adamw", "muon") for s, p in ((0, 10.0), (1, 20.0), (2, 15.0))]  # fmt: skip
    assert al.analyse(runs, (0, 1, 2))["mha"]["at_best_rates"]["verdict"] == "reproduced"  # 100 ± 0


class _Ledger:
    """Records what would be trained; the loss is least at lr 0.01."""

    def __init__(self):
        self.trained = []

    def tokenized(self, fields):
        return fields

    def train(self, fields, name, measure=None):
        key = (fields["model"]["attention"], fields["optimizer"], fields["learning_rate"])
        self.trained.append((*key, fields["seed"]))
        loss = (math.log10(key[2]) + 2) ** 2 + fields["seed"]
        return dict(final_eval_loss=loss, max_logit_peak=1.0, max_logit_final=1.0, ratio_peak=0.0)


def test_sweep_extends_past_the_edge_and_trains_mha_at_the_best_mla_rate():
    setup = al.scale_setup("gpu", quick=False, devices=1)  # MLA on the grid, MHA at its best
    ledger = _Ledger()
    al.train(argparse.Namespace(mesh=None), ledger, setup)
    rates = {(a, o): sorted({lr for a2, o2, lr, _ in ledger.trained if (a2, o2) == (a, o)})
             for a in ("mla", "mha") for o in ("adamw", "muon")}  # fmt: skip
    assert rates["mla", "adamw"] == [0.001, 0.00178, 0.00316, 0.00562, 0.01, 0.0178]
    assert rates["mla", "muon"] == [0.00178, 0.00316, 0.00562, 0.01, 0.0178]
    assert rates["mha", "adamw"] == rates["mha", "muon"] == [0.01]
    assert len(ledger.trained) == len(set(ledger.trained)) == 2 * (6 + 5 + 2)  # 2 seeds each


def test_quick_cpu_end_to_end_and_resumed_from_its_ledger(tmp_path):
    results = run_experiment("attention_logits", tmp_path, "--quick")
    assert (tmp_path / "attention_logits.png").stat().st_size > 0
    runs, seeds = results["runs"], results["seeds"]
    # MLA on the grid (one rate each at --quick), MHA at each optimizer's best MLA rate
    assert len(runs) == 2 * 2 * len(seeds) and seeds == [0, 1]
    for r in runs:
        assert (
            math.isfinite(r["final_eval_loss"])
            and r["fields"]["model"]["attention"] == r["attention"]
        )
        layers = r["fields"]["model"]["n_layers"]
        curve = np.asarray(r["curve"]["max_logit_per_layer"])
        assert curve.shape == (len(r["curve"]["step"]), layers) and len(curve) <= al.CURVE_POINTS
        assert r["max_logit_peak"] >= max(r["max_logit_final"], curve.max() - 1e-3)
        assert 0 <= r["ratio_peak"] <= 1 and r["fields"]["large_logit_threshold"] == 1.0
    assert any(r["ratio_peak"] > 0 for r in runs)  # the quick threshold is crossed
    for att in ("mla", "mha"):
        c = results["analysis"][att]["at_best_rates"]
        assert c["muon_minus_adamw"]["n"] == 2 and c["verdict"] in (
            "reproduced", "not reproduced", "inconclusive")  # fmt: skip
    # relaunched, it trains nothing: every run comes from the ledger
    again = run_experiment("attention_logits", tmp_path, "--quick")
    assert again["runs"] == runs and again["training_time_s"] == results["training_time_s"]


@pytest.mark.parametrize("scale", ["gpu", "pod"])
def test_quick_gpu_and_pod_train_through_their_data_paths(tmp_path, scale):
    runs = run_scale("attention_logits", tmp_path, scale)["runs"]
    assert len(runs) == 8 and all(math.isfinite(r["max_logit_peak"]) for r in runs)


def test_dry_run_reports_each_config(tmp_path):
    report = dry_run_report(al, tmp_path)
    assert sorted(report) == ["mha-adamw", "mha-muon", "mla-adamw", "mla-muon"]
    assert all(r["config"]["model"]["attention"] == name[:3] for name, r in report.items())


def test_pod_is_the_papers_appendix_d_setting():
    setup = al.scale_setup("pod", quick=False, devices=256)
    b = setup["base"]
    assert b["preset"] == "moonlight-16b-a3b" and setup["models"]["mla"] == {}
    assert (b["batch_size"], b["seq_len"], b["steps"], b["grad_accum"]) == (2048, 8192, 35000, 8)
    assert setup["start"] == {"adamw": (4.2e-4,), "muon": (4.2e-4,)}
    assert b["large_logit_threshold"] == al.PAPER["threshold"] == 100
    cpu = al.scale_setup("cpu", quick=False, devices=1)
    assert cpu["grid"] == ("mla",) and cpu["extend"] and set(cpu["models"]) == {"mla", "mha"}
    assert all(len(r) >= 3 for r in cpu["start"].values())
