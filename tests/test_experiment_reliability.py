"""experiments/reliability.py at its smallest: the reference run, one kill -9
trial, one SIGTERM trial, one bad input, two untrusted inputs; results.json's
structure, and every trial passed. (A signal in the final flush: tests/test_preemption.py.)"""

import pytest
from conftest import run_experiment

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

TRIAL_KEYS = {"trial", "signal", "trigger", "delay_s", "phase", "exit_code", "hung", "stderr",
              "relaunches", "identical", "failures", "passed", "ran_on"}  # fmt: skip


def test_smallest_run_records_every_trial_and_each_passes(tmp_path):
    results = run_experiment("reliability", tmp_path, "--quick", "--trials-kill9", "1",
                             "--trials-signal", "1", "--bad-inputs", "1",
                             "--untrusted", "index ../ file", "shard bytes changed")  # fmt: skip
    assert results["quick"] is True
    assert {"jax", "orbax-checkpoint"} <= set(results["versions"])
    config = results["config"]
    assert (config["trials_kill9"], config["trials_signal"], config["steps"]) == (1, 1, 12)
    assert results["reference"]["wall_s"] > results["reference"]["flush_s"] > 0
    kill9, signals, bad = results["kill9"], results["signal"], results["bad_inputs"]
    assert [(t["signal"], t["trigger"]) for t in kill9] == [("SIGKILL", "start")]
    assert [(t["signal"], t["trigger"]) for t in signals] == [("SIGTERM", "start")]
    for t in kill9 + signals:
        assert TRIAL_KEYS <= set(t), t
        assert t["phase"] in ("start-up", "set-up", "training", "final flush", "exited"), t
        assert 1 <= len(t["relaunches"]) <= results["config"]["max_relaunches"], t
        # the failures first, in full: a long record's repr is cut short
        why = (t["failures"], t["phase"], t["exit_code"], t["relaunches"], t)
        assert t["passed"] and t["identical"] and not t["failures"], why
        # only a start-up signal may leave the run going on to its end (see the script)
        assert not t["ran_on"] or (t["phase"], t["exit_code"]) == ("start-up", 0), t
    assert len(bad) == 1
    for b in bad:
        assert (b["exit_code"], b["stderr_lines"], b["wrote"], b["passed"]) == (2, 1, [], True), b
    hostile = results["untrusted"]
    assert [t["name"] for t in hostile] == ["shard bytes changed", "index ../ file"]
    for t in hostile:
        assert (t["exit_code"], t["stderr_lines"], t["left"], t["passed"]) == (2, 1, [], True), t
        assert t["peak_rss_mib"] > 0 and t["command"][0] == "muonjax"
    summary = results["summary"]
    assert summary["kill9"] == {
        "identical": 1,
        "trials": 1,
        "by_phase": summary["kill9"]["by_phase"],
    }
    assert (summary["signal"]["handled"], summary["signal"]["trials"]) == (1, 1)
    assert summary["signal"]["by_signal"] == {"SIGTERM": {"passed": 1, "trials": 1}}
    assert summary["bad_inputs"] == {"passed": 1, "tried": 1}
    assert (summary["untrusted"]["passed"], summary["untrusted"]["hung"]) == (2, 0)
    assert summary["all_passed"]
