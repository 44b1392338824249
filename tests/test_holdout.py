"""The held-out split and the evaluations (issue 27, item 1): whole documents chosen
by content hash, windows spread over all of them, SFT scored one example per row
with its prompt, an end-of-run evaluation on --final-eval-tokens, and old runs and
shards keeping the split they were made with."""

import hashlib
import json

import numpy as np
import pytest

from muonjax.train import ConfigError, TrainConfig
from muonjax.train.corpus import split_examples, split_texts
from muonjax.train.pipeline import ExampleRows, TokenWindows, eval_batches
from muonjax.train.shards import (
    MANIFEST,
    check_manifest,
    inherit_from_shards,
    read_manifest,
    write_shards,
)
from muonjax.train.tokenizer import ByteTokenizer, encode_examples


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(f"doc {i} " + "x" * int(rng.integers(50, 500)) for i in range(n))


def test_documents_are_held_out_whole_by_content_hash_wherever_they_are():
    docs = _docs(200)
    train, held = split_texts(docs, 0.1)
    total = sum(map(len, docs))
    assert sum(map(len, held)) == total - round(total * 0.9)  # the fraction, to the character
    whole = [d for d in held if d in docs]
    assert len(whole) >= len(held) - 1  # only the document the cut passes through is split
    positions = sorted(docs.index(d) for d in whole)
    assert positions[0] < 50 and positions[-1] > 150  # from all over the corpus, not its end
    # chosen by content: the same documents in another order hold out the same text
    shuffled = tuple(np.random.default_rng(1).permutation(docs))
    assert sorted(split_texts(shuffled, 0.1)[1]) == sorted(held)
    # training keeps corpus order, and nothing is lost or shared
    assert [d for d in train if d in docs] == [d for d in docs if d in train]
    assert sorted("".join(train) + "".join(held)) == sorted("".join(docs))
    # the held-out documents are those with the largest hashes
    digest = {d: hashlib.sha256(d.encode()).digest() for d in docs}
    assert min(digest[d] for d in whole) > max(digest[d] for d in train if d in docs)


def test_one_document_is_split_like_the_tail():
    assert split_texts(("abcdefghij",), 0.3) == (["abcdefg"], ["hij"])


def test_examples_are_held_out_by_hash_in_file_order():
    pairs = [(f"prompt {i}", f"response {i}") for i in range(100)]
    train, held = split_examples(pairs, 0.2)
    assert len(held) == 20 and len(train) == 80 and set(train).isdisjoint(held)
    assert held == sorted(held, key=pairs.index) and train == sorted(train, key=pairs.index)
    assert held != pairs[80:]  # not the end of the file
    assert split_examples(pairs, 0.2, "tail") == (pairs[:80], pairs[80:])


def test_eval_windows_spread_over_the_whole_held_out_stream():
    tokens = np.arange(10_000) % 251
    windows = TokenWindows(tokens, 9)  # 1000 windows of 10 tokens
    batches = eval_batches(windows, 4, 5)
    starts = [int(np.flatnonzero(tokens == row[0])[0]) for b in batches for row in b]
    firsts = [row[0] for b in eval_batches(windows, 4, 5, spread=False) for row in b]
    np.testing.assert_array_equal(firsts, tokens[0:200:10])  # before: the first 20 windows
    rows = np.concatenate(batches)
    np.testing.assert_array_equal(rows[:, 0], [windows[i][0] for i in range(0, 1000, 50)])
    assert starts[0] == 0 and rows.shape == (20, 10)
    # fewer windows than asked for: all of them, the last batch filled with empty rows
    few = eval_batches(TokenWindows(tokens[:70], 9), 4, 5)
    assert len(few) == 2 and np.all(few[1][3:] == -1) and np.all(few[1][:3] >= 0)


def test_sft_rows_are_whole_examples_with_their_prompts():
    pairs = [("q1", "a1"), ("question two", "answer"), ("p" * 40, "r" * 40), ("", "lone")]
    tokens = encode_examples(ByteTokenizer(), pairs)
    rows = ExampleRows(tokens, seq_len=15)
    assert len(rows) == 3  # the empty prompt's example is read with the one before it
    first = rows[0]
    assert list(-first[:2] - 1) == list(b"q1") and list(first[2:4]) == list(b"a1")
    assert first[4] == ByteTokenizer().end_id and np.all(first[5:] == -1)
    long = rows[2]  # 81 tokens in a row of 16: the prompt's last 8, the response's first 8
    assert np.all(long[:8] < 0) and np.all(long[8:] == ord("r"))
    # every held-out example is scored: one per row, across batches
    batches = eval_batches(rows, 2, 100)
    assert sum(len(b) for b in batches) == 4 and np.all(batches[-1][1] == -1)


def test_old_configs_and_manifests_keep_the_tail_split(tmp_path):
    saved = TrainConfig().to_json()
    del saved["holdout"]
    assert TrainConfig.from_json(saved).holdout == "tail"
    assert TrainConfig.from_json(TrainConfig().to_json()).holdout == "documents"


def test_holdout_is_recorded_by_tokenize_and_fixed_by_shards(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(_docs(30)):
        (corpus / f"{i}.txt").write_text(text)
    out = tmp_path / "shards"
    config = TrainConfig(data=(str(corpus),), holdout="tail")
    write_shards(config, out, log=lambda *_: None)
    assert read_manifest(out)["config"]["holdout"] == "tail"
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["config"]["holdout"]  # made before --holdout existed
    (out / MANIFEST).write_text(json.dumps(manifest))
    made = read_manifest(out)
    assert made["config"]["holdout"] == "tail"
    assert inherit_from_shards({"data": [str(out)]})["holdout"] == "tail"
    check_manifest(TrainConfig(data=(str(out),), holdout="tail"), made, str(out))
    with pytest.raises(ConfigError, match="--holdout tail"):
        check_manifest(TrainConfig(data=(str(out),)), made, str(out))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_a_run_logs_its_flops_and_a_final_evaluation(corpus, tmp_path, optimizer):
    import jax
    from conftest import tiny_run

    from muonjax.parallel.mesh import make_mesh, parse_mesh
    from muonjax.train import read_metrics, run
    from muonjax.train.costs import newton_schulz_total
    from muonjax.train.data import load_data
    from muonjax.train.pipeline import eval_rows
    from muonjax.train.program import build

    config = tiny_run(
        corpus, tmp_path / "run", steps=3, eval_every=3, final_eval_tokens=1000, optimizer=optimizer
    )
    summary = run(config, log=lambda *_: None)
    records = read_metrics(tmp_path / "run")
    last = [r for r in records if "loss" in r][-1]
    # Newton-Schulz FLOPs of every Muon matrix, each step; none for AdamW
    program = build(
        config,
        config.model_config(vocab_size=256),
        make_mesh(parse_mesh("data=1"), jax.devices()[:1]),
    )
    per_step = newton_schulz_total(program.shapes.params, ns_steps=config.ns_steps)
    assert per_step > 0
    assert last["optimizer_flops"] == (3 * per_step if optimizer == "muon" else 0)
    assert last["flops"] == last["model_flops"] + last["optimizer_flops"] == summary.flops
    # the end-of-run evaluation: once, after the last step, on ceil(1000 / 256) batches of
    # windows spread over the held-out text (all of them if fewer), every next token a target
    finals = [r for r in records if "final_eval_loss" in r]
    assert [r["step"] for r in finals] == [3]
    assert summary.final_eval_loss == finals[0]["final_eval_loss"]
    windows = len(eval_rows(load_data(config, tmp_path / "run").validation_tokens, 32, False))
    assert finals[0]["final_eval_tokens"] == 32 * min(windows, 4 * 8)
    assert abs(summary.final_eval_loss - summary.eval_loss) < 0.5
