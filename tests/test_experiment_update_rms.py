"""experiments/update_rms.py (paper Table 1 and Table 8): the analysis against
values computed by hand; --quick end to end at every scale (AdamW's rate, the
three rules, the lr x rms_scale grid, the ledger, results.json, plot) and --dry-run."""

import math

import pytest
import sweep
from conftest import dry_run_report, load_experiment, run_experiment, run_scale

from muonjax.train import TrainConfig

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

ur = load_experiment("update_rms")


def _run(lr, loss, seed=0, optimizer="muon", rule="moonlight", rms_scale=0.2, update=None):
    return dict(optimizer=optimizer, rule=rule, rms_scale=rms_scale, learning_rate=lr, seed=seed,
                final_eval_loss=loss, update_rms=update, weight_rms={"AttnQ": 0.1})  # fmt: skip


def test_best_rate_on_seed_means_needs_every_seed():
    runs = [_run(0.01, 2.0), _run(0.01, 2.2, seed=1),  # mean 2.1
            _run(0.0178, 1.9), _run(0.0178, 2.1, seed=1),  # mean 2.0: the best
            _run(0.0316, 1.5), _run(0.0316, None, seed=1),  # a seed diverged
            _run(0.0562, 1.0)]  # one seed only  # fmt: skip
    means = sweep.rate_means(runs, (0, 1), rule="moonlight")
    assert sweep.best_rate(means) == 0.0178 and means[0.01] == pytest.approx(2.1)
    assert means[0.0316] is None and means[0.0562] is None
    assert sweep.rate_means(runs, (0, 1), rule="hidden") == {}


def test_rms_match_is_the_worst_group_within_a_factor_two():
    adamw = {0: {"AttnQ": 0.25, "Dense": 0.25}, 1: {"AttnQ": 0.3, "Dense": 0.2}}
    muon = {0: {"AttnQ": 0.2, "Dense": 0.1}, 1: {"AttnQ": 0.2, "Dense": 0.2}}
    m = ur.rms_match(muon, adamw)
    # seed 0: max(|ln 0.8|, |ln 0.4|) = ln 2.5; seed 1: max(|ln(2/3)|, 0) = ln 1.5
    assert m["worst_log_ratio_by_seed"] == pytest.approx({0: math.log(2.5), 1: math.log(1.5)})
    assert m["margin"]["mean"] == pytest.approx(math.log(2) - (math.log(2.5) + math.log(1.5)) / 2)
    assert m["verdict"] == "inconclusive"  # ln 2 - m: -0.22 and +0.29
    close = {s: {g: 0.9 * v for g, v in u.items()} for s, u in adamw.items()}
    assert ur.rms_match(close, adamw)["verdict"] == "reproduced"
    far = {s: {g: 0.2 * v for g, v in u.items()} for s, u in adamw.items()}
    assert ur.rms_match({**far, 2: far[0]}, {**adamw, 2: adamw[0]})["verdict"] == "not reproduced"


def test_table1_pairs_the_rules_over_seeds():
    runs, u = [], {"AttnQ": 0.2, "Dense": 0.2}
    for seed, (base, norm, adj, adamw) in enumerate([(3.0, 2.9, 2.95, 3.2), (3.1, 2.98, 3.0, 3.3),
                                                     (3.05, 2.95, 2.99, 3.25)]):  # fmt: skip
        runs += [_run(0.01, base, seed, rule="hidden", update=u),
                 _run(0.01, norm, seed, rule="update_norm", update=u),
                 _run(0.01, adj, seed, update={"AttnQ": 0.19, "Dense": 0.18}),
                 _run(0.01, adamw, seed, optimizer="adamw", rule=None, rms_scale=None, update=u),
                 _run(0.0178, 1.0, seed, rule="hidden")]  # another rate: left out  # fmt: skip
    t = ur.table1(runs, 0.01)
    d = t["differences"]["Baseline - Update Norm"]
    assert d["estimate"]["values"] == pytest.approx([0.1, 0.12, 0.1]) and d["paper"] == 0.023
    assert d["verdict"] == "reproduced"  # mean 0.1067, half-width 4.303 x 0.01155 / sqrt 3
    adjusted = t["differences"]["Baseline - Adjusted LR"]["estimate"]
    assert adjusted["values"] == pytest.approx([0.05, 0.1, 0.06])
    assert t["rows"]["Baseline"]["loss"]["mean"] == pytest.approx(3.05)
    assert t["rows"]["Adjusted LR"]["update_rms"] == pytest.approx({"AttnQ": 0.19, "Dense": 0.18})
    assert t["rms_match"]["verdict"] == "reproduced"  # ratios 0.95 and 0.9 on every seed


def test_table8_judges_each_scale_at_its_own_best_rate():
    grid = {0.1: {0.01: (3.0, 3.1), 0.0178: (2.8, 2.9), 0.0316: (2.7, 2.78)},  # best at the edge
            0.2: {0.01: (2.9, 2.96), 0.0178: (2.71, 2.79), 0.0316: (2.8, 2.9)},  # best inside
            0.4: {0.00562: (2.8, 2.85), 0.01: (2.68, 2.78), 0.0178: (2.9, 3.0)}}  # fmt: skip
    runs = [_run(lr, loss, seed, rms_scale=s) for s, rates in grid.items()
            for lr, losses in rates.items() for seed, loss in enumerate(losses)]  # fmt: skip
    t = ur.table8(runs, (0, 1), adamw_lr=0.01)
    best = {s: r["learning_rate"] for s, r in t["rows"].items()}
    assert best == {0.1: 0.0316, 0.2: 0.0178, 0.4: 0.01}
    assert t["rows"][0.1]["at_grid_edge"] and not t["rows"][0.2]["at_grid_edge"]
    assert t["rows"][0.2]["product"] == pytest.approx(0.00356)
    # products of the interior optima: 0.00356 and 0.004, 4 log10(0.004 / 0.00356) quarter-decades
    spread = 4 * math.log10(0.004 / 0.00356)  # 0.2024: rounded to 0.2
    assert t["product_spread_quarter_decades"] == pytest.approx(spread, abs=0.005)
    assert t["best_scale"] == 0.4  # at their best rates: 2.74 (0.1), 2.75 (0.2), 2.73 (0.4)
    assert t["best_at_adamw_rate"] == 0.4  # at 0.01 alone: 3.05, 2.93, 2.73
    assert t["vs_0_2"][0.1]["values"] == pytest.approx([-0.01, -0.01])
    # 0.2 - best = (0.03, 0.01); minus the tolerance 0.005 x 2.75: (0.016, -0.004): inconclusive
    assert t["gap_to_best"]["values"] == pytest.approx([0.03, 0.01])
    assert t["tolerance"] == pytest.approx(0.01375) and t["verdict"] == "inconclusive"


def test_quick_cpu_end_to_end_and_resumed_from_its_ledger(tmp_path):
    results = run_experiment("update_rms", tmp_path, "--quick")
    assert (tmp_path / "update_rms.png").stat().st_size > 0
    runs, a = results["runs"], results["analysis"]
    # AdamW on 2 seeds at 1 rate; 3 rules on 2 seeds (Adjusted LR at 0.2 is also Table 8's);
    # Table 8: rms_scale 0.2 and 0.8 x 2 rates x 2 seeds
    assert len(runs) == 2 + 3 * 2 + (4 - 1) * 2
    for r in runs:
        assert math.isfinite(r["final_eval_loss"]) and r["fields"]["checkpoint_every"] == 4
        assert {"AttnQ", "AttnKV", "AttnO", "Dense"} <= set(r["update_rms"]) == set(r["weight_rms"])
    rows = a["table1"]["rows"]
    assert set(rows) == {"AdamW", "Baseline", "Update Norm", "Adjusted LR"}
    assert all(r["loss"]["n"] == 2 for r in rows.values())
    # Update Norm sets every matrix's update RMS to rms_scale exactly (Eq. 6); Baseline
    # (sqrt(H)) gives the [H, 4H] MLP half Adjusted LR's (sqrt(4H)), the same square query
    norm = rows["Update Norm"]["update_rms"]
    assert norm == pytest.approx(dict.fromkeys(norm, 0.2), rel=1e-3)
    base, adjusted = rows["Baseline"]["update_rms"], rows["Adjusted LR"]["update_rms"]
    assert base["Dense"] / adjusted["Dense"] == pytest.approx(0.5, rel=0.05)
    assert base["AttnQ"] / adjusted["AttnQ"] == pytest.approx(1.0, rel=0.05)
    t8 = a["table8"]["rows"]
    assert set(t8) == {"0.2", "0.8"} and all(len(r["means_by_rate"]) == 2 for r in t8.values())
    # Adjusted LR's update RMS follows rms_scale
    ratio = t8["0.8"]["update_rms"]["Dense"] / t8["0.2"]["update_rms"]["Dense"]
    assert ratio == pytest.approx(4, rel=0.05)
    for d in a["table1"]["differences"].values():
        assert d["estimate"]["n"] == 2
    assert a["table8"]["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    assert results["paper"]["table8"]["0.8"]["Dense_weight_rms"] == 8.73e-2
    # relaunched, it trains nothing: every run comes from the ledger
    again = run_experiment("update_rms", tmp_path, "--quick")
    assert again["runs"] == runs and again["training_time_s"] == results["training_time_s"]


@pytest.mark.parametrize("scale", ["gpu", "pod"])
def test_quick_gpu_and_pod_train_through_their_data_paths(tmp_path, scale):
    runs = run_scale("update_rms", tmp_path, scale)["runs"]
    assert len(runs) == 4 and all(
        math.isfinite(r["final_eval_loss"]) for r in runs
    )  # AdamW, 3 rules


def test_dry_run_reports_each_config(tmp_path):
    report = dry_run_report(ur, tmp_path)
    assert set(report) == {"adamw", "muon"}
    for r in report.values():
        assert r["config"]["model"]["intermediate_size"] == 4 * r["config"]["model"]["d_model"]


def test_pod_is_table2s_822m_made_dense_at_4b_of_20b_tokens():
    setup = ur.scale_setup("pod", quick=False, devices=8)
    c = TrainConfig(**ur.fields_of(setup, None), learning_rate=setup["adamw"][0])
    m = c.model_config()
    assert (m.d_model, m.n_layers, m.n_heads, m.intermediate_size) == (2048, 16, 16, 8192)
    assert m.first_k_dense == 16 and c.learning_rate == 8.825e-4
    tokens = c.batch_size * c.seq_len
    assert c.steps * tokens == pytest.approx(4e9, rel=1e-3)
    assert c.decay_steps * tokens == pytest.approx(20e9, rel=1e-3)
    assert (c.steps - 1) % c.checkpoint_every == 0  # the last two steps are checkpointed
    grid = ur.rate_grid(8.825e-4)
    assert grid[grid.index(8.825e-4) + 1] == pytest.approx(8.825e-4 * 10**0.25, rel=1e-3)
    assert ur.rate_grid(0.01) == sweep.RATES
