"""experiments/qk_clip.py end to end at toy size: a pair of Muon runs without
and with QK-Clip (whose tau the toy logits cross), their curves and summaries,
the step-overhead measurement, results.json and the plot."""

import numpy as np
import pytest
from conftest import load_experiment, run_experiment

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

qk_clip = load_experiment("qk_clip")


def test_quick_run_clips_and_measures_the_overhead(tmp_path):
    results = run_experiment("qk_clip", tmp_path, "--quick")
    assert (tmp_path / "qk_clip.png").stat().st_size > 0
    names = qk_clip.run_names(qk_clip.QUICK_PAIRS)
    assert list(results["runs"]) == names == ["mha_3e-2", "mha_3e-2_clip"]
    plain, clipped = (results["configs"][n] for n in names)
    assert plain["qk_clip"] is None and clipped["qk_clip"] == qk_clip.QUICK_TAU
    assert {k: v for k, v in plain.items() if k != "qk_clip"} == {
        k: v for k, v in clipped.items() if k != "qk_clip"
    }
    without, with_clip = (results["runs"][n] for n in names)
    assert without["final"]["max_logit_peak"] > qk_clip.QUICK_TAU
    heads = np.asarray(with_clip["train"]["qk_clipped_heads_per_layer"])
    np.testing.assert_array_equal(heads.sum(1), with_clip["train"]["qk_clipped_heads"])
    assert with_clip["final"]["logged_steps_clipping"] > 0
    assert with_clip["final"]["max_logit_final"] < without["final"]["max_logit_final"]
    o = results["overhead"]
    assert o["heads_clipped"] > 0 and o["steps_each"] == len(o["times_s"]["on"]) > 0
    assert o["ratio"] == o["step_s_with"] / o["step_s_without"]
