"""Pre-tokenized ArrayRecord shards (`muonjax tokenize`, `train --data DIR`):
the shards hold exactly the text path's token streams, each process reads only
the records of its own windows, two processes' rows make one process's
batches, and a run from shards trains and resumes exactly as from text."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_run

from muonjax.train import TrainConfig, read_metrics, run
from muonjax.train.corpus import tokenize
from muonjax.train.errors import ConfigError
from muonjax.train.pipeline import READ_OPTIONS, TokenWindows, eval_batches, train_batches
from muonjax.train.shards import (
    MANIFEST,
    RECORD_TOKENS,
    ShardedTokens,
    inherit_from_shards,
    read_manifest,
    write_shards,
)


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
    """The corpus in shards of 3 records (so windows cross records and files)."""
    out = tmp_path_factory.mktemp("shards") / "byte"
    write_shards(TrainConfig(data=(corpus,)), out, shard_tokens=3 * RECORD_TOKENS, log=print)
    return out


def _streams(directory):
    manifest = read_manifest(directory)
    return [ShardedTokens(directory, split, manifest) for split in ("train", "validation")]


def test_shards_hold_the_text_paths_token_streams(corpus, shards, tmp_path):
    train, validation, _, description = tokenize(TrainConfig(data=(corpus,)), tmp_path)
    manifest = json.loads((shards / MANIFEST).read_text())
    assert manifest["source"]["fingerprint"] == description["fingerprint"]
    assert manifest["splits"]["train"]["dtype"] == "|u1"  # bytes stored as bytes
    assert len(manifest["splits"]["train"]["shards"]) == -(-len(train) // (3 * RECORD_TOKENS))
    sharded_train, sharded_validation = _streams(shards)
    assert (len(sharded_train), len(sharded_validation)) == (len(train), len(validation))
    np.testing.assert_array_equal(sharded_validation[:], validation)
    rng = np.random.default_rng(0)
    edges = [RECORD_TOKENS - 3, 3 * RECORD_TOKENS - 5, len(train) - 7]  # records, files, the end
    for start in [*edges, *rng.integers(0, len(train) - 1, 20)]:
        stop = start + int(rng.integers(1, 2 * RECORD_TOKENS))
        np.testing.assert_array_equal(sharded_train[start:stop], train[start:stop], err_msg=start)


class _Recording(ShardedTokens):
    """ShardedTokens that records where each window it reads starts."""

    def __init__(self, *args):
        super().__init__(*args)
        self.starts = set()

    def __getitem__(self, window):
        self.starts.add(window.start)
        return super().__getitem__(window)


def test_each_process_reads_its_own_rows_and_two_make_one(shards):
    manifest = read_manifest(shards)
    seq, batch, steps = 63, 8, 6
    whole = train_batches(ShardedTokens(shards, "train", manifest), seq, batch, seed=3)
    one = [next(whole) for _ in range(steps)]
    parts = [_Recording(shards, "train", manifest) for _ in range(2)]
    iterators = [train_batches(p, seq, batch, seed=3, process_index=i, process_count=2)
                 for i, p in enumerate(parts)]  # fmt: skip
    for b in range(steps):
        np.testing.assert_array_equal(np.concatenate([next(it) for it in iterators]), one[b])
    # no window read by both; each read its rows of the batches so far and of those it
    # reads ahead (READ_OPTIONS), a small part of the stream's windows
    assert not parts[0].starts & parts[1].starts
    ahead = READ_OPTIONS.prefetch_buffer_size + READ_OPTIONS.num_threads
    for p in parts:
        assert batch // 2 * steps <= len(p.starts) <= batch // 2 * (steps + ahead)
    assert batch // 2 * (steps + ahead) < len(TokenWindows(parts[0], seq)) / 50
    # the same windows as the text path's token array
    text = np.concatenate([s[:] for s in _streams(shards)[:1]])
    windows = TokenWindows(text, seq)
    assert len(windows) == len(TokenWindows(parts[0], seq))
    e_text = eval_batches(TokenWindows(text, seq), batch, 2)
    e_shards = eval_batches(TokenWindows(parts[0], seq), batch, 2)
    np.testing.assert_array_equal(np.stack(e_text), np.stack(e_shards))


def test_iterator_resumes_exactly_on_shards(shards):
    manifest = read_manifest(shards)
    tokens = ShardedTokens(shards, "train", manifest)
    it = train_batches(tokens, 31, 4, seed=1)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    again = train_batches(ShardedTokens(shards, "train", manifest), 31, 4, seed=1)
    again.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(again), want)


@pytest.mark.slow
def test_a_run_from_shards_equals_one_from_text_and_resumes_exactly(corpus, shards, tmp_path):
    quiet = lambda *_: None
    same = dict(steps=4, decay_steps=4, eval_every=4)  # the schedule of 4 steps, also at 2
    text = run(tiny_run(corpus, tmp_path / "text", **same), log=quiet)
    fields = inherit_from_shards({"data": (str(shards),)})
    assert fields["tokenizer"] == "byte" and fields["validation_fraction"] == 0.02
    config = tiny_run(corpus, tmp_path / "shards", **same, **fields)
    run(config.replace(steps=2), log=quiet)
    resumed = run(config, resume=True, log=quiet)
    loss = lambda out: [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r]
    assert loss(tmp_path / "shards") == loss(tmp_path / "text")
    assert resumed.eval_loss == text.eval_loss
    saved = json.loads((tmp_path / "shards" / "config.json").read_text())["data"]
    assert saved["shards"] == str(shards.absolute()) and saved["train_tokens"] > 0


def test_bpe_sft_shards_and_their_errors(tmp_path):
    lines = [json.dumps({"prompt": f"def f{i}(x):", "response": f"    return x * {i}\n"})
             for i in range(300)]  # fmt: skip
    (tmp_path / "sft.jsonl").write_text("\n".join(lines))
    fields = dict(data=(str(tmp_path / "sft.jsonl"),), data_format="sft-jsonl", tokenizer="bpe",
                  bpe_vocab_size=300, validation_fraction=0.1)  # fmt: skip
    write_shards(TrainConfig(**fields), tmp_path / "sft", log=lambda *_: None)
    manifest = read_manifest(tmp_path / "sft")
    assert (tmp_path / "sft" / "tokenizer.json").is_file()
    assert manifest["splits"]["train"]["dtype"] == "<i4"  # prompts are stored negative
    train, _, tokenizer, _ = tokenize(TrainConfig(**fields), tmp_path / "sft")
    np.testing.assert_array_equal(ShardedTokens(tmp_path / "sft", "train", manifest)[:], train)
    assert manifest["vocab_size"] == tokenizer.vocab_size
    # the shards fix the tokenizer: a run that says otherwise is told so
    from muonjax.train.data import load_data

    with pytest.raises(ConfigError, match="tokenized with --tokenizer bpe"):
        load_data(TrainConfig(data=(str(tmp_path / "sft"),), data_format="sft-jsonl"), tmp_path)
    with pytest.raises(ConfigError, match="pass it alone"):
        load_data(TrainConfig(data=(str(tmp_path / "sft"), str(tmp_path / "sft.jsonl"))), tmp_path)
    with pytest.raises(ConfigError, match="exists"):
        write_shards(TrainConfig(**fields), tmp_path / "sft")
    # the command line: bad data is one line, exit 2, nothing written
    bad = subprocess.run(
        [sys.executable, "-m", "muonjax", "tokenize", "--data", str(tmp_path / "missing"),
         "--out", str(tmp_path / "never")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "never").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
