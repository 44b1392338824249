"""experiments/optax_contrib_diff.py end to end: the measured differences from
optax.contrib.muon that docs/optimizer.md's "Differences from optax.contrib.muon" cites."""

import json

import pytest
from conftest import load_experiment

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

optax_contrib_diff = load_experiment("optax_contrib_diff")


def test_measures_the_documented_differences(tmp_path):
    optax_contrib_diff.main(tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    steps = optax_contrib_diff.STEPS
    for name in ("defaults", "matched_scale", "optax_blend_by_us", "no_nesterov"):
        assert [r["step"] for r in results[name]] == list(range(1, steps + 1)), name
    defaults = results["defaults"]
    # ours: update RMS about 0.2 lr by design (Jordan's Newton-Schulz leaves it a bit below)
    assert all(r["ours_rms_over_lr"] == pytest.approx(0.2, rel=0.1) for r in defaults)
    # optax's default scale sqrt(max(1, B/A)) = sqrt(2) against ours 0.2 sqrt(512): 0.3125
    assert defaults[0]["scalar_fit"] == pytest.approx(0.3125, rel=1e-4)
    assert defaults[0]["rel_diff_after_fit"] < 1e-4
    # with optax's scale set to ours, step 1 coincides and later steps differ by
    # the bias-corrected Nesterov blend, less at every step as c_t -> 1
    matched = [r["rel_diff"] for r in results["matched_scale"]]
    assert matched[0] < 1e-4
    assert all(d > 1e-2 for d in matched[1:])
    assert all(a > b for a, b in zip(matched[1:], matched[2:]))
    # that blend, orthogonalized by us, is optax's update; without Nesterov both agree
    for name in ("optax_blend_by_us", "no_nesterov"):
        assert all(r["rel_diff"] < 1e-4 for r in results[name]), name
    routing = results["routing"]
    assert {k: (r["ours_group"], r["optax_group"]) for k, r in routing.items()} == {
        "bias": ("adamw", "adam"),
        "embed/embedding": ("adamw", "muon"),
        "layers/w": ("muon", "adam"),
    }
    # optax's Adam branch is NAdam: its first step is (1 + b1 / (1 + b1)) lr per entry
    assert routing["bias"]["optax_rms_over_lr"] == pytest.approx(1 + 0.9 / 1.9, rel=1e-3)
    assert routing["bias"]["ours_rms_over_lr"] == pytest.approx(1.0, rel=1e-3)
