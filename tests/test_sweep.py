"""experiments/sweep.py: the ledger a sweep resumes from, and the statistics over
seeds every finding reports."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import sweep
from conftest import tiny_run

from muonjax.train import TrainConfig


def test_estimate_is_the_mean_with_a_student_t_interval():
    values = [1.0, 2.0, 4.0]
    e = sweep.estimate(values)
    assert e.mean == pytest.approx(np.mean(values)) and e.std == pytest.approx(
        np.std(values, ddof=1)
    )
    assert e.half_width == pytest.approx(4.303 * e.std / math.sqrt(3))  # t(0.975, df=2)
    assert sweep.estimate([5.0]).half_width == math.inf
    none = sweep.estimate([])  # every seed diverged
    assert none.n == 0 and math.isnan(none.mean) and sweep.verdict(none, 1) == "inconclusive"


def test_paired_differences_use_the_seeds_both_have():
    d = sweep.paired({0: 3.0, 1: 5.0, 2: 9.0}, {0: 1.0, 1: 2.0, 3: 7.0})
    assert d.values == (2.0, 3.0) and d.mean == 2.5


@pytest.mark.parametrize(
    "values, sign, expected",
    [
        ([0.10, 0.11, 0.12], 1, "reproduced"),
        ([0.10, 0.11, 0.12], -1, "not reproduced"),
        ([-0.1, 0.1, 0.05], 1, "inconclusive"),
        ([0.2], 1, "inconclusive"),  # one seed decides nothing
    ],
)
def test_verdict_needs_the_interval_on_one_side(values, sign, expected):
    assert sweep.verdict(sweep.estimate(values), sign) == expected


def test_rate_sweeps_go_past_an_edge_and_seeds_are_averaged():
    tried = []

    def loss(lr):  # least at 0.1; diverges above 0.3
        tried.append(lr)
        return None if lr > 0.3 else (math.log10(lr) + 1) ** 2

    losses = sweep.sweep_rates(loss, (0.001, 0.00178, 0.00316))
    assert tried == [0.001, 0.00178, 0.00316, 0.00562, 0.01, 0.0178, 0.0316, 0.0562, 0.1, 0.178]
    assert sweep.best_rate(losses) == 0.1 and sweep.best_rate({0.1: None}) is None
    assert sweep.sweep_rates(loss, (0.001,), extend=False) == {0.001: 4.0}

    class Ledger:
        def train(self, fields, name, measure=None):
            return {"final_eval_loss": None if fields["seed"] == 9 else fields["seed"], "n": name}

        def tokenized(self, fields):
            return dict(fields, data=("shards",))

    runs, mean = sweep.train_seeds(Ledger(), lambda s: {"seed": s, "tokenizer": "bpe"}, (1, 2),
                                   "muon lr 0.1", tag="x")  # fmt: skip
    assert mean == 1.5 and runs == [{"final_eval_loss": 1, "n": "muon lr 0.1 seed 1", "seed": 1,
                                     "tag": "x"}, {"final_eval_loss": 2, "n": "muon lr 0.1 seed 2",
                                                   "seed": 2, "tag": "x"}]  # fmt: skip
    assert sweep.train_seeds(Ledger(), lambda s: {"seed": s}, (1, 9), "adamw")[1] is None


def test_a_spent_budget_starts_no_run(tmp_path, capsys):
    from conftest import load_experiment

    qk = load_experiment("qk_clip")
    assert qk.main(["--quick", "--budget", "0", "--out", str(tmp_path)]) == 0
    assert "--budget 0 min spent before muon lr 0.0178 seed 0: 0 runs" in capsys.readouterr().out
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "runs").exists()
    config = tiny_run("unused", "unused")
    ledger = sweep.Ledger(tmp_path, budget=0)
    ledger.records[sweep.run_key(config, tmp_path)] = {"final_eval_loss": 1.0}
    assert ledger.train(config.to_json(), "recorded") == {"final_eval_loss": 1.0}
    with pytest.raises(sweep.BudgetSpent, match="new"):
        ledger.train(config.replace(seed=1).to_json(), "new")


def test_run_key_ignores_where_a_run_is_written():
    a = TrainConfig(out="/a", progress=True, learning_rate=1e-2)
    assert sweep.run_key(a) == sweep.run_key(a.replace(out="/b", progress=False))
    assert sweep.run_key(a) != sweep.run_key(a.replace(seed=1))


def test_run_key_survives_moving_the_ledger(tmp_path):
    keys = []
    for root in (tmp_path / "here", tmp_path / "there"):
        (root / "data").mkdir(parents=True)
        (root / "data" / "a.txt").write_text("text")
        config = TrainConfig(data=(str(root / "data"),), init_from=str(root / "runs" / "k"))
        keys.append(sweep.run_key(config, root))
    assert keys[0] == keys[1]


SCRIPT = """
import sys
import sweep
from conftest import tiny_run

corpus, out = sys.argv[1], sys.argv[2]
ledger = sweep.Ledger(out)
for seed in range(3):
    fields = tiny_run(corpus, "unused", steps=40, checkpoint_every=5, eval_every=20,
                      seed=seed, final_eval_tokens=256).to_json()
    ledger.train(fields, f"seed {seed}")
"""


@pytest.mark.slow
def test_a_killed_sweep_trains_only_what_is_missing(corpus, tmp_path):
    script = tmp_path / "sweep_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(sweep.ROOT / "experiments"),
                                                         str(sweep.ROOT / "tests")])}  # fmt: skip
    cmd = [sys.executable, str(script), corpus, str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    second = tiny_run(corpus, "unused", steps=40, checkpoint_every=5, eval_every=20,
                      seed=1, final_eval_tokens=256)  # fmt: skip
    checkpoints = out / "runs" / sweep.run_key(second) / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            os.kill(proc.pid, signal.SIGKILL)  # the first run recorded, the second half-done
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()
    first = json.loads((out / "ledger.json").read_text())
    assert [r["name"] for r in first.values()] == ["seed 0"]
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    records = json.loads((out / "ledger.json").read_text())
    assert sorted(r["name"] for r in records.values()) == ["seed 0", "seed 1", "seed 2"]
    by_name = {r["name"]: r for r in records.values()}
    assert by_name["seed 0"] == next(iter(first.values()))  # not trained again
    assert by_name["seed 1"]["resumed"] and not by_name["seed 2"]["resumed"]
    assert "seed 0" not in again.stdout  # only what was missing was trained
    # the resumed run is the run it would have been: its metrics go on to step 40
    assert by_name["seed 1"]["steps"] == 40 and by_name["seed 1"]["final_eval_loss"] > 0
