"""Fine-tuning: prompt/response JSONL data whose prompt tokens are input only,
and runs that start from another run's checkpoint (--init-from)."""

import json
import os
import random
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from muonjax.parallel.mesh import make_mesh, parse_mesh
from muonjax.train import ConfigError, TrainConfig, read_metrics, run, step
from muonjax.train.corpus import load_examples, split_examples, stdlib_files
from muonjax.train.finetune import inherit_from_source, initial_state, load_source
from muonjax.train.loop import load_data
from muonjax.train.pipeline import TokenWindows, train_batches
from muonjax.train.program import build
from muonjax.train.tokenizer import BPETokenizer, ByteTokenizer, encode_examples, tokenizer_for_run

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

QUIET = dict(log=lambda *_: None)
# Same model, shapes and schedule in the source and the fine-tunes: one compiled
# program. One MoE layer: router biases (`rest`) too, and a short compile.
MODEL = {"n_layers": 1, "first_k_dense": 0}
SHAPES = dict(model=MODEL, batch_size=8, seq_len=32, warmup_steps=0, decay_steps=10, progress=False)


def _write_jsonl(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return str(path)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    rng = random.Random(0)
    pairs = []
    for _ in range(300):
        a, b = rng.randrange(1000), rng.randrange(1000)
        pairs.append((f"Q: {a}+{b}=", f" {a + b}"))
    return _write_jsonl(tmp_path_factory.mktemp("sft") / "train.jsonl", pairs)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny pretraining run of 2 steps on some stdlib text (Muon)."""
    folder = tmp_path_factory.mktemp("text")
    for path in stdlib_files()[1][:8]:
        shutil.copy(path, folder)
    out = tmp_path_factory.mktemp("runs") / "source"
    run(TrainConfig(out=str(out), data=(str(folder),), steps=2, **SHAPES), **QUIET)
    return out


def _finetune(out, sft_file, source, **changes):
    base = dict(
        out=str(out),
        data=(sft_file,),
        data_format="sft-jsonl",
        init_from=str(source),
        validation_fraction=0.1,
        steps=2,
        log_every=1,
        **SHAPES,
    )
    return TrainConfig(**{**base, **changes})


# -- (a) the token stream: prompts input only ------------------------------------------------


def test_prompt_tokens_are_stored_negative(tmp_path):
    pairs = [("ab", "c"), ("", "é\n"), ("xyz", "")]
    path = tmp_path / "d.jsonl"
    # blank lines, CRLF line ends and extra keys are fine
    path.write_text(
        '{"prompt": "ab", "response": "c", "id": 1}\r\n\n   \n'
        '{"prompt": "", "response": "\\u00e9\\n"}\n{"response": "", "prompt": "xyz"}'
    )
    examples = load_examples((str(path),))
    assert examples.pairs == tuple(pairs)
    tokens = encode_examples(ByteTokenizer(), examples.pairs)
    end = 0xFF
    want = [-1 - ord("a"), -1 - ord("b"), ord("c"), end, 0xC3, 0xA9, ord("\n"), end]
    want += [-1 - ord(c) for c in "xyz"] + [end]
    assert tokens.dtype == np.int32 and tokens.tolist() == want
    # the pipeline's windows carry the stored values unchanged
    window = TokenWindows(tokens, seq_len=3)[1]
    assert window.dtype == np.int32 and window.tolist() == want[4:8]

    # BPE: the prompt decodes from the negative tokens, the response from the rest
    bpe = BPETokenizer.train([p + r for p, r in pairs] * 20, 300)
    stream = encode_examples(bpe, [("hello there", " general")])
    prompt, response = stream[stream < 0], stream[stream >= 0]
    assert bpe.decode(-1 - prompt) == "hello there"
    assert response[-1] == bpe.end_id and bpe.decode(response[:-1]) == " general"
    assert bpe.end_id not in bpe.encode(["ÿ\xff text"])[0]  # no text encodes to it


def test_sft_data_splits_by_example(tmp_path, sft_file):
    config = TrainConfig(
        out=str(tmp_path / "x"),
        data=(sft_file,),
        data_format="sft-jsonl",
        validation_fraction=0.1,
        **SHAPES,
    )
    data = load_data(config, tmp_path / "x")
    d = data.description
    assert (d["examples"], d["train_examples"], d["validation_examples"]) == (300, 270, 30)
    assert d["train_target_tokens"] == int(np.sum(data.train_tokens >= 0))
    assert 0 < d["train_target_tokens"] < d["train_tokens"] == len(data.train_tokens)
    assert len(d["fingerprint"]) == 64
    # every example: prompt (negative) "Q: a+b=", then " sum" and the end byte
    pairs = load_examples((sft_file,)).pairs
    held = split_examples(pairs, 0.1)[1]  # by each pair's hash (--holdout documents)
    assert len(held) == 30 and held != list(pairs[270:])
    np.testing.assert_array_equal(data.validation_tokens, encode_examples(ByteTokenizer(), held))
    assert np.sum(data.train_tokens == 0xFF) == 270
    # with --tokenizer bpe, the BPE is trained on the training prompts and responses
    bpe = load_data(config.replace(tokenizer="bpe", bpe_vocab_size=300), tmp_path / "x")
    assert bpe.tokenizer.vocab_size <= 300 and bpe.tokenizer.end_id is not None


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "line 2 is not JSON"),
        ('["a", "b"]', "line 2 is a JSON list, not an object"),
        ('{"prompt": "a"}', 'line 2 has no "response"'),
        ('{"prompt": 3, "response": "b"}', 'line 2: "prompt" must be a string, got int'),
    ],
)
def test_bad_jsonl_line_is_a_config_error(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=match) as e:
        load_examples((str(path),))
    assert str(path) in str(e.value)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        config = TrainConfig(out=str(out), data=(str(path),), data_format="sft-jsonl", **SHAPES)
        run(config, **QUIET)
    assert not out.exists()


# -- (b) input-only tokens are not targets -----------------------------------------------------


@pytest.mark.skipif(
    not hasattr(step, "split_targets"),
    reason="waits on the input-only token mask (step.split_targets) in muonjax/train/step.py",
)
def test_a_prompt_tokens_target_changes_no_gradient():
    dense = {"n_layers": 1, "first_k_dense": 1}  # the loss is the point here: compile fast
    model_config = TrainConfig(model=dense).model_config(vocab_size=256)
    graphdef, state = step.init_state(model_config, optax.sgd(0.1), seed=0)
    grads_of = jax.jit(
        lambda tokens: step.loss_and_grads(graphdef, state.params, state.rest, tokens)
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (2, 17)).astype(np.int32)
    tokens = np.where(np.arange(17) % 3 == 0, -1 - ids, ids)  # every third token a prompt token
    # the last token of a window is only a target (never an input): as a prompt
    # token, whatever its id, it changes neither the loss nor any gradient
    tokens[:, -1] = -1 - 7
    changed = tokens.copy()
    changed[:, -1] = -1 - 200
    (ce, _, grads), (ce2, _, grads2) = grads_of(tokens), grads_of(changed)
    assert float(ce) == float(ce2)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_array_equal(a, b)
    # as a response token it does
    tokens[:, -1], changed[:, -1] = 7, 200
    assert float(grads_of(tokens)[0]) != float(grads_of(changed)[0])
    # and the model reads a prompt token's id: another id changes the loss
    changed = tokens.copy()
    changed[:, 3] = -1 - (ids[:, 3] + 1) % 256
    assert float(grads_of(tokens)[0]) != float(grads_of(changed)[0])


# -- (c) --init-from -----------------------------------------------------------------------------


def _source_state(source, program):
    """The source's final TrainState, restored independently of muonjax.train.finetune."""
    step_dir = max(int(p.name) for p in (source / "checkpoints").iterdir() if p.name.isdigit())
    path = os.path.abspath(source / "checkpoints" / str(step_dir) / "state")
    return ocp.StandardCheckpointer().restore(path, program.abstract())


def _program(config):
    return build(config, config.model_config(vocab_size=256), make_mesh(parse_mesh(config.mesh)))


def test_finetune_starts_from_the_source_params(tmp_path, sft_file, source):
    copy = tmp_path / "source"  # a copy, removed below, to show a resume does not read it
    shutil.copytree(source, copy)
    config = _finetune(tmp_path / "ft", sft_file, copy)
    run(config, **QUIET)
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["init_from"]["path"] == str(copy.absolute()) and saved["init_from"]["step"] == 2
    assert saved["data"]["examples"] == 300 and saved["data"]["train_target_tokens"] > 0
    # the first logged loss is the source's parameters' loss on the first batch
    program = _program(config)
    data = load_data(config, tmp_path / "ft")
    first = next(train_batches(data.train_tokens, 32, 8, config.seed))
    first = jax.device_put(first, program.batch)
    first_loss = [m["loss"] for m in read_metrics(tmp_path / "ft") if "loss" in m][0]
    from_source, from_scratch = (
        float(np.divide(*program.eval(state, first)))
        for state in (_source_state(source, program), program.init())
    )
    assert first_loss == pytest.approx(from_source, rel=1e-5)
    assert abs(first_loss - from_scratch) > 100 * abs(first_loss - from_source)
    # a resume continues from the fine-tune's own checkpoint, without the source
    shutil.rmtree(copy / "checkpoints")
    logged = []
    summary = run(config.replace(steps=3), resume=True, log=logged.append)
    assert summary.steps == 3 and any("resumed from step 2" in line for line in logged)
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["init_from"]["step"] == 2


@pytest.mark.parametrize("keep", [False, True])
def test_optimizer_state_is_fresh_or_kept(tmp_path, sft_file, source, keep):
    config = _finetune(tmp_path / "ft", sft_file, source, init_optimizer_state=keep)
    program = _program(config)
    model_config = config.model_config(vocab_size=256)
    state = initial_state(load_source(config), program, keep, model_config)
    theirs, fresh = _source_state(source, program), program.init()
    assert int(state.step) == int(state.skipped) == int(state.nonfinite) == 0
    weights = lambda s: jax.tree.leaves((s.params, s.rest))
    for a, b in zip(weights(state), weights(theirs)):
        np.testing.assert_array_equal(a, b)
    counts = lambda s: [v for _, v in optax.tree_utils.tree_get_all_with_path(s, "count")]
    assert all(int(c) == 0 for c in counts(state.opt_state))  # the schedule starts again
    moments = lambda s: jax.tree.leaves(optax.tree_utils.tree_set(s, count=0))
    want = moments(theirs.opt_state if keep else fresh.opt_state)
    for a, b in zip(moments(state.opt_state), want):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(np.asarray(x) != 0) for x in moments(theirs.opt_state))


def test_inherit_from_source(source):
    fields = inherit_from_source({"init_from": str(source), "steps": 5, "tokenizer": "byte"})
    assert fields["preset"] == "tiny" and fields["model"] == MODEL
    assert fields["bpe_vocab_size"] == 1024
    assert fields["steps"] == 5
    assert inherit_from_source({"steps": 5}) == {"steps": 5}
    TrainConfig(**fields)


def test_bpe_of_the_source_is_reused(tmp_path):
    BPETokenizer.train(["some source text"] * 10, 280).save(tmp_path)
    reused = tokenizer_for_run("bpe", tmp_path / "new", ["other"] * 10, 300, source=tmp_path)
    assert reused.vocab_size == BPETokenizer.load(tmp_path / "tokenizer.json").vocab_size


# -- (d) what may not be fine-tuned ---------------------------------------------------------------


def test_finetune_config_errors(tmp_path, sft_file, source):
    no_checkpoint = tmp_path / "empty_run"
    no_checkpoint.mkdir()
    shutil.copy(source / "config.json", no_checkpoint / "config.json")
    cases = [
        (dict(init_from=str(tmp_path / "nowhere")), "no config.json there"),
        (dict(init_from=str(no_checkpoint)), "has no complete checkpoint"),
        (
            dict(model={**MODEL, "d_model": 32, "n_layers": 2}),
            "model differs from that run's (d_model: 64 there, 32 here, n_layers: 1 there, 2 here)",
        ),
        (
            dict(optimizer="adamw", init_optimizer_state=True),
            "--init-optimizer-state needs the same optimizer, but it used muon and this run adamw",
        ),
        (dict(tokenizer="bpe"), "it used --tokenizer byte, this run bpe"),
    ]
    for i, (changes, match) in enumerate(cases):
        out = tmp_path / f"run{i}"
        with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
            run(_finetune(out, sft_file, source, **changes), **QUIET)
        assert not out.exists()
    # a different optimizer with a fresh optimizer state is fine: checked, not run here
    load_source(_finetune(tmp_path / "ok", sft_file, source, optimizer="adamw"))
