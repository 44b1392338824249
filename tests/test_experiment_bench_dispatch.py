"""experiments/bench_dispatch.py --quick end to end: every dispatch method timed
forward and backward, with XLA's FLOPs over the routed FLOPs."""

import pytest
from conftest import run_experiment

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow


def test_quick_writes_results(tmp_path):
    results = run_experiment("bench_dispatch", tmp_path, "--quick")
    assert results["backend"] == "cpu"
    runs = results["runs"]
    assert len(runs) == 6  # one shape, two routings, three methods
    for name, r in runs.items():
        assert r["seconds"] > 0, name
    tiles = [r for name, r in runs.items() if name.endswith(", tiles")]
    # every routed FLOP counted, with at most the padding rows more
    assert all(1.0 <= r["xla_flops_over_routed"] < 1.25 for r in tiles), tiles
