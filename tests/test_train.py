"""The trainer: exact resume (also after kill -9), data determinism, metrics,
non-finite steps and BPE. (That it learns: test_precision, test_model.)"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import DENSE, tiny_run

from muonjax.models import param_counts
from muonjax.train import TrainingStopped, read_metrics, run
from muonjax.train.corpus import load_corpus, split_texts
from muonjax.train.optimizers import learning_rate_schedule
from muonjax.train.pipeline import TokenWindows, eval_batches, train_batches
from muonjax.train.tokenizer import tokenizer_for_run

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

DOCUMENTED_FIELDS = {
    "step",
    "loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_s",
    "update_rms_muon",
    "update_rms_adamw",
    "weight_rms_muon",
    "weight_rms_adamw",
    "max_attention_logit",
    "expert_load_imbalance",
    "skipped_steps",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few hundred KB of real text: some of this Python's own stdlib."""
    folder = tmp_path_factory.mktemp("corpus")
    texts = load_corpus().texts[:40]
    for i, text in enumerate(texts):
        (folder / f"doc{i:02d}.py").write_text(text)
    return str(folder)


_config = tiny_run


def _losses(out):
    return [(m["step"], m["loss"]) for m in read_metrics(out) if "loss" in m]


def _final_state(out, step):
    return jax.tree.leaves(
        ocp.StandardCheckpointer().restore(os.path.abspath(f"{out}/checkpoints/{step}/state"))
    )


def _assert_same_state(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_resume_is_bit_identical(corpus, tmp_path):
    # the preset cut to its MoE layer (its router biases are state too), and QK-Clip at a
    # tau the tiny model's logits (about 0.1) cross: the clip is exact too
    clip = {"qk_clip": 0.08, "model": {"n_layers": 1, "first_k_dense": 0}}
    whole = run(_config(corpus, tmp_path / "whole", steps=12, **clip), log=lambda *_: None)
    run(_config(corpus, tmp_path / "split", steps=6, decay_steps=12, **clip), log=lambda *_: None)
    resumed = run(
        _config(corpus, tmp_path / "split", steps=12, decay_steps=12, **clip),
        resume=True,
        log=lambda *_: None,
    )
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "split")
    clipped = [m["qk_clipped_heads"] for m in read_metrics(tmp_path / "whole") if "loss" in m]
    assert 0 < sum(clipped) < 12 * 4, clipped  # some heads of the layer's 4, not all
    assert len(_losses(tmp_path / "whole")) == 12
    assert whole.eval_loss == resumed.eval_loss
    _assert_same_state(_final_state(tmp_path / "whole", 12), _final_state(tmp_path / "split", 12))
    # TensorBoard: one event file per start, the second opening with a session start at
    # step 7 (TensorBoard hides what earlier files logged from there on), the losses all there
    first, second = (_events(p) for p in sorted((tmp_path / "split" / "tensorboard").iterdir()))
    assert [e.step for e in second if e.HasField("session_log")] == [7]
    losses = {
        (e.step, v.simple_value) for e in first + second for v in e.summary.value if v.tag == "loss"
    }
    assert sorted(losses) == [
        (step, np.float32(loss)) for step, loss in _losses(tmp_path / "whole")
    ]


def _events(path) -> list:
    """The Event records of a TensorBoard event file (TFRecord: length, its CRC, data, CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        length = int.from_bytes(data[at : at + 8], "little")
        events.append(Event.FromString(data[at + 12 : at + 12 + length]))
        at += 12 + length + 4
    return events


def test_metrics_have_the_documented_fields(corpus, tmp_path):
    """...and config.json records the resolved model, the log its parameter counts."""
    lines = []
    # one MoE layer (expert_load_imbalance), no dense one: half the compile time
    model = {"d_model": 48, "n_heads": 2, "n_routed_experts": 4, "n_layers": 1, "first_k_dense": 0}
    config = _config(corpus, tmp_path / "run", steps=6, optimizer="adamw", model=model)
    summary = run(config, log=lines.append)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["d_model"] == 48 and saved["model"]["n_routed_experts"] == 4
    assert saved["train"]["model"] == model
    counts = param_counts(config.model_config(vocab_size=256))
    assert saved["parameters"]["total"] == counts["total"]
    assert any(f"{counts['total']:,} total, {counts['active']:,} active" in line for line in lines)
    assert summary.steps == 6 and summary.tokens == 6 * 8 * 32
    assert summary.flops > 0 and summary.metrics_path.endswith("metrics.jsonl")
    records = read_metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for r in steps[1:]:  # the first step's time is compilation
        assert DOCUMENTED_FIELDS <= r.keys(), DOCUMENTED_FIELDS - r.keys()
        assert all(np.isfinite(r[k]) for k in DOCUMENTED_FIELDS)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["optimizer"] == "adamw" and len(config["data"]["fingerprint"]) == 64
    assert (
        config["parameters"]["total"]
        == config["parameters"]["muon_group"] + config["parameters"]["adamw_group"]
    )
    assert any(
        p.name.startswith("events.out.tfevents")
        for p in (tmp_path / "run" / "tensorboard").iterdir()
    )


def test_data_pipeline_is_deterministic_and_resumes_exactly():
    tokens = np.arange(10_000, dtype=np.uint16)  # every window distinct
    first = train_batches(tokens, 31, 4, seed=3)
    batches = [next(first) for _ in range(100)]  # crosses an epoch (78 windows)
    again = train_batches(tokens, 31, 4, seed=3)
    for b in batches:
        np.testing.assert_array_equal(next(again), b)
    assert not np.array_equal(next(train_batches(tokens, 31, 4, seed=4)), batches[0])
    # state round trip: a new iterator set to the state after 37 batches goes on identically
    it = train_batches(tokens, 31, 4, seed=3)
    for _ in range(37):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    restored = train_batches(tokens, 31, 4, seed=3)
    restored.set_state(state)
    for b in batches[37:]:
        np.testing.assert_array_equal(next(restored), b)
    # windows are contiguous text; each epoch visits every window once
    assert np.all(np.diff(batches[0].astype(int), axis=1) == 1)
    epoch = {row[0] for b in batches[:19] for row in b}
    assert len(epoch) == 76
    # two processes each get their rows of the same global batches
    halves = [
        train_batches(tokens, 31, 4, seed=3, process_index=i, process_count=2) for i in range(2)
    ]
    for b in batches[:10]:
        np.testing.assert_array_equal(np.concatenate([next(h) for h in halves]), b)
    windows = TokenWindows(tokens, 31)
    for spread in (True, False):
        assert len(eval_batches(windows, 4, 3, spread=spread)) == 3
        np.testing.assert_array_equal(
            np.concatenate([eval_batches(windows, 4, 3, i, 2, spread)[1] for i in range(2)]),
            eval_batches(windows, 4, 3, spread=spread)[1],
        )


def test_tail_split_holds_out_the_end():
    train_texts, validation = split_texts(("abcdefgh", "ijkl"), 0.25, "tail")
    assert "".join(train_texts) == "abcdefghi" and "".join(validation) == "jkl"
    train_texts, validation = split_texts(("abcd", "efgh"), 0.5, "tail")
    assert train_texts == ["abcd"] and validation == ["efgh"]


def test_nonfinite_steps_are_skipped_then_the_run_stops(corpus, tmp_path):
    # A learning rate of 1e12 sends AdamW's parameters to inf within a few steps.
    config = _config(
        corpus,
        tmp_path / "run",
        steps=30,
        optimizer="adamw",
        learning_rate=1e12,
        warmup_steps=0,
        checkpoint_every=1,
        max_nonfinite=3,
    )
    with pytest.raises(TrainingStopped, match="3 steps in a row had a non-finite loss") as stopped:
        run(config, log=lambda *_: None)
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert records[-1]["skipped_steps"] == 3
    # the logged learning rate is the applied one: skipped steps do not advance the
    # optimizer's count, so the three skipped steps log the rate of the first of them
    first_skipped = records[-3]["step"]
    applied = float(learning_rate_schedule(config)(first_skipped - 1))
    assert [r["learning_rate"] for r in records[-3:]] == pytest.approx([applied] * 3, rel=1e-6)
    assert float(learning_rate_schedule(config)(first_skipped + 1)) != pytest.approx(applied)
    last_good = int(str(stopped.value).split("--resume-from ")[1].split()[0])
    assert last_good == records[-1]["step"] - 3
    assert all(np.all(np.isfinite(x)) for x in _final_state(tmp_path / "run", last_good))


def test_kill_during_save_resumes_from_last_complete_checkpoint(corpus, tmp_path):
    args = [
        "--data",
        corpus,
        "--model",
        DENSE,
        "--steps",
        "24",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--log-every",
        "1",
        "--eval-every",
        "100",
        "--checkpoint-every",
        "2",
        "--warmup-steps",
        "2",
        "--no-progress",
    ]
    cmd = [sys.executable, "-m", "muonjax", "train"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--out", str(killed), *args], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill -9 while a save is in flight
        folder = killed / "checkpoints"
        if (
            folder.exists()
            and any("tmp" in p.name for p in folder.iterdir())
            and len(list(folder.iterdir())) > 2
        ):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(
        [*cmd, "--out", str(killed), "--resume", "--no-progress"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stdout + resumed.stderr
    whole = subprocess.run(
        [*cmd, "--out", str(tmp_path / "whole"), *args], capture_output=True, text=True
    )
    assert whole.returncode == 0, whole.stderr
    assert _losses(killed) == _losses(tmp_path / "whole")
    _assert_same_state(_final_state(killed, 24), _final_state(tmp_path / "whole", 24))


def test_bpe_tokenizer_is_trained_saved_and_reused(corpus, tmp_path):
    config = _config(corpus, tmp_path / "run", steps=2, tokenizer="bpe", bpe_vocab_size=512)
    run(config, log=lambda *_: None)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["vocab_size"] == 512 and saved["model"]["vocab_size"] == 512
    # a resumed run loads the saved tokenizer rather than training another
    reused = tokenizer_for_run("bpe", tmp_path / "run", ["other text entirely"], 300)
    assert reused.vocab_size == 512
    text = load_corpus((corpus,)).texts[0][:2000]
    assert reused.decode(reused.encode([text])[0]) == text
    # BPE packs more text per token than bytes do
    assert saved["data"]["train_tokens"] < 0.6 * saved["data"]["characters"]
