"""experiments/bench_hf_load.py --quick end to end: a tiny bfloat16 checkpoint in
several shards, loaded in fresh processes by from_hf and by reading it whole
first, with their peak memory recorded."""

import pytest
from conftest import run_experiment

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow


def test_quick_writes_results(tmp_path):
    results = run_experiment("bench_hf_load", tmp_path, "--quick")
    (size,) = results["sizes"]
    assert results["quick"] and size["checkpoint"]["shards"] > 1
    assert size["model_float32_mib"] > size["checkpoint"]["mib"] > 0  # float32 = 2 x bfloat16
    for mode in ("from_hf", "read_whole_first"):
        row = size[mode]
        assert row["peak_rss_mib"] >= size["baseline"]["peak_rss_mib"], mode
        assert row["transient_mib"] >= 0 and row["seconds"] > 0, mode
