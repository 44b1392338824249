"""experiments/tpu_fit.py end to end at toy size: every part's configurations
compiled for TPU slices, the ledger keyed by the command, and a rerun that
compiles nothing it has."""

import subprocess
import sys

import pytest
from conftest import EXPERIMENTS, load_experiment, run_experiment

from muonjax.parallel.tpu import libtpu_version

# runs an experiment: left out of make test-fast
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(libtpu_version() is None, reason="libtpu not installed"),
]

tpu_fit = load_experiment("tpu_fit")


def test_quick_run_compiles_each_part_for_tpu_and_resumes(tmp_path):
    ledger = run_experiment("tpu_fit", tmp_path, "--quick")
    parts = {part: tpu_fit.plan(part, quick=True) for part in ("16b", "dense", "cpu", "kernels")}
    expected = [c for p, cs in parts.items() for c in cs] + [tpu_fit.on_cpu(parts["cpu"][0])]
    assert sorted(ledger) == sorted(" ".join(c) for c in expected)
    for key, report in ledger.items():
        on_tpu = "--tpu" in key
        assert report["platform"] == ("tpu" if on_tpu else "cpu"), key
        assert report["peak_bytes"] > 0 and report["compile_seconds"] > 0
        if on_tpu:
            assert report["fits"] and report["estimate_step_seconds"] > 0
    muon, adamw = (ledger[" ".join(c)] for c in parts["16b"])
    assert (muon["optimizer"], adamw["optimizer"]) == ("muon", "adamw")
    assert muon["optimizer_flops"] > adamw["optimizer_flops"]
    # the same mesh simulated on CPU devices: the same arrays, another compiler
    command = parts["cpu"][0]
    tpu, cpu = ledger[" ".join(command)], ledger[" ".join(tpu_fit.on_cpu(command))]
    assert tpu["param_bytes"] == cpu["param_bytes"] and tpu["mesh"] == cpu["mesh"]
    again = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "tpu_fit.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "inspect " not in again.stdout  # every configuration is in the ledger
