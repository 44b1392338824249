"""Resuming a run: it is the run wherever its paths point, it keeps its
learning-rate schedule, it refuses to go backwards, and it goes on past a
divergence from a chosen checkpoint with a lower learning rate and the
diverging batches skipped, recorded in config.json's history."""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_run

from muonjax.train import TrainConfig, TrainingStopped, read_metrics, run
from muonjax.train.corpus import load_corpus, split_texts
from muonjax.train.errors import ConfigError
from muonjax.train.optimizers import learning_rate_schedule
from muonjax.train.pipeline import train_batches
from muonjax.train.tokenizer import ByteTokenizer

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

QUIET = lambda *_: None  # noqa: E731


def _config(corpus, out, **changes):
    return tiny_run(corpus, out, **{"steps": 8, "eval_every": 100, **changes})


def _losses(out):
    return [(m["step"], m["loss"]) for m in read_metrics(out) if "loss" in m]


def _saved(out) -> dict:
    return json.loads((pathlib.Path(out) / "config.json").read_text())


def _restore(out, step) -> tuple[list, dict]:
    folder = pathlib.Path(out, "checkpoints", str(step)).absolute()
    state = jax.tree.leaves(ocp.StandardCheckpointer().restore(folder / "state"))
    return state, json.loads((folder / "meta" / "metadata").read_text())


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """(folder, Summary) of a run of 8 steps with checkpoints 4 and 8, started with an
    absolute --data; each test works on a copy (a copied run resumes: it is the run)."""
    out = tmp_path_factory.mktemp("recovery") / "run"
    config = _config(os.path.abspath(corpus), out, eval_every=8, decay_steps=12)
    return out, run(config, log=QUIET)


def test_resume_compares_what_the_run_computes_not_how_paths_are_spelled(
    corpus, finished, tmp_path, monkeypatch
):
    # copied, resumed from another working directory, every path spelled otherwise
    shutil.copytree(finished[0], tmp_path / "b" / "run")
    monkeypatch.chdir(tmp_path / "b")
    data = os.path.relpath(corpus, tmp_path / "b") + "/"
    summary = run(_config(data, "./run/", steps=10, decay_steps=12), resume=True, log=QUIET)
    # resumed from its checkpoint (bit-identical resumes: tests/test_train.py)
    assert summary.steps == 10 and [s for s, _ in _losses("run")] == [*range(1, 11)]
    assert [h["from_step"] for h in _saved("run")["history"]] == [0, 8]
    # what it computes from must still be the same: other text is refused
    other = shutil.copytree(corpus, tmp_path / "other")
    with open(sorted(other.iterdir())[0], "a") as f:
        f.write("#")
    with pytest.raises(ConfigError, match="training text differs"):
        run(_config(str(other), "run", steps=12, decay_steps=12), resume=True, log=QUIET)


def test_a_longer_resume_keeps_the_schedule_unless_told_otherwise(corpus, tmp_path):
    out = tmp_path / "run"
    config = _config(corpus, out, steps=6)
    run(config, log=QUIET)
    assert _saved(out)["train"]["decay_steps"] == 6  # fixed at the start
    logs = []
    run(config.replace(steps=10), resume=True, log=logs.append)
    schedule = learning_rate_schedule(config.replace(decay_steps=6))
    rates = [m["learning_rate"] for m in read_metrics(out) if "learning_rate" in m]
    np.testing.assert_allclose(rates, [schedule(k) for k in range(10)], rtol=1e-6)
    assert rates[6:] == [pytest.approx(config.min_lr_ratio * config.learning_rate)] * 4
    assert any("schedule ends at step 6" in line for line in logs), logs
    assert "changes" not in _saved(out)["history"][-1]
    # told otherwise: a new horizon, logged and recorded in the run's history
    run(config.replace(steps=12, decay_steps=20), resume=True, log=logs.append)
    assert _saved(out)["history"][-1]["changes"] == {"decay_steps": [6, 20]}
    longer = learning_rate_schedule(config.replace(decay_steps=20))
    rates = [m["learning_rate"] for m in read_metrics(out) if "learning_rate" in m]
    assert rates[-1] == pytest.approx(float(longer(11)))
    assert any("decay_steps 6 -> 20" in line for line in logs), logs


def test_resume_refuses_fewer_steps_and_has_nothing_to_do_at_the_end(finished, tmp_path):
    source, done = finished
    out = shutil.copytree(source, tmp_path / "run")
    config = TrainConfig.from_json(_saved(out)["train"]).replace(out=str(out))
    before = (out / "config.json").read_bytes()
    with pytest.raises(ConfigError, match=r"at step 8 already, past --steps 4; pass --steps 8"):
        run(config.replace(steps=4), resume=True, log=QUIET)
    assert (out / "config.json").read_bytes() == before  # nothing written
    again = run(config, resume=True, log=QUIET)
    assert (again.steps, again.loss, again.eval_loss) == (8, done.loss, done.eval_loss)
    assert done.loss is not None and len(_losses(out)) == 8


def test_divergence_stops_with_finite_checkpoints_and_is_recovered_from_one(corpus, tmp_path):
    out = tmp_path / "run"
    steps = 14
    # the rate ramps up (40 x step) until the run diverges (at about step 8)
    diverging = _config(
        corpus,
        out,
        steps=steps,
        learning_rate=4e4,
        warmup_steps=1000,
        checkpoint_every=1,
        keep_checkpoints=100,
        max_nonfinite=2,
    )
    with pytest.raises(TrainingStopped, match="--resume-from") as stop:
        run(diverging, log=QUIET)
    stopped = int(str(stop.value).split("stopped at step ")[1].split(":")[0])
    assert stopped < steps
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
    assert saved and saved[-1] < stopped
    for step in saved:  # only finite parameters are ever checkpointed
        assert all(np.all(np.isfinite(x)) for x in _restore(out, step)[0]), step
    diverged_metrics = read_metrics(out)

    logs = []
    recovered = run(
        diverging.replace(learning_rate=0.01), resume_from=1, skip_batches=3, log=logs.append
    )
    assert recovered.steps == steps and np.isfinite(recovered.loss)
    assert [s for s, _ in _losses(out)] == list(range(1, steps + 1))  # each step once
    # the abandoned branch is kept, never deleted: its checkpoints and its metrics
    names = {p.name for p in (out / "checkpoints").iterdir()}
    assert {f"{s}" for s in range(1, steps + 1)} - names == set()
    abandoned = sorted(int(n.split(".")[0]) for n in names if ".abandoned-" in n)
    assert abandoned == [s for s in saved if s > 1]
    (kept,) = out.glob("metrics.abandoned-*.jsonl")
    assert [json.loads(line) for line in kept.read_text().splitlines()] == [
        m for m in diverged_metrics if m["step"] > 1
    ]
    history = _saved(out)["history"]
    assert history[-1]["from_step"] == 1 and history[-1]["skipped_batches"] == 3
    assert history[-1]["changes"] == {"learning_rate": [4e4, 0.01]}
    assert any("learning_rate 40000.0 -> 0.01" in line for line in logs), logs
    # the data: steps batches trained on, 3 skipped after step 1
    texts, _ = split_texts(load_corpus((corpus,)).texts, diverging.validation_fraction)
    tokens = np.concatenate([t for t in ByteTokenizer().encode(texts)])
    batches = train_batches(tokens, 32, 8, diverging.seed)
    for _ in range(steps + 3):
        next(batches)
    assert _restore(out, steps)[1]["data"] == json.loads(json.dumps(batches.get_state()))


def test_recovery_input_errors(corpus, finished, tmp_path):
    out = shutil.copytree(finished[0], tmp_path / "run")
    config = TrainConfig.from_json(_saved(out)["train"]).replace(out=str(out))
    with pytest.raises(ConfigError, match=r"--resume-from 3: no checkpoint 3 .*\(there: 4, 8\)"):
        run(config, resume_from=3, log=QUIET)
    with pytest.raises(ConfigError, match="--skip-batches must be >= 0"):
        run(config, resume=True, skip_batches=-1, log=QUIET)
    with pytest.raises(ConfigError, match="nothing to resume"):
        run(_config(corpus, tmp_path / "new"), skip_batches=2, log=QUIET)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4", "8"]
