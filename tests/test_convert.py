"""`muonjax convert` (Hugging Face checkpoint <-> run directory), `muonjax generate`,
and `muonjax train --init-from` a Hugging Face checkpoint, through the CLI."""

import json
import pathlib
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from muonjax.cli import main
from muonjax.models import generate
from muonjax.models.hf import from_hf
from muonjax.train.corpus import load_corpus
from muonjax.train.tokenizer import CheckpointTokenizer

# trains, starts processes or runs an experiment: left out of make test-fast
pytestmark = pytest.mark.slow

FIXTURE = pathlib.Path(__file__).parent / "data" / "hf" / "deepseek_v3_tiny"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
    """The tiny fixture with a tokenizer.json (a BPE of 300 ids, under the model's
    320, as checkpoints pad theirs) and a tokenizer_config.json naming BOS / EOS."""
    directory = tmp_path_factory.mktemp("hf") / "ckpt"
    shutil.copytree(FIXTURE, directory)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(load_corpus().texts[:5], trainer=trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def _tensors(directory):
    out = {}
    for file in sorted(pathlib.Path(directory).glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            out |= {name: f.get_tensor(name) for name in f.keys()}
    return out


@pytest.fixture(scope="module")
def converted(hf_dir, corpus, tmp_path_factory) -> pathlib.Path:
    run = tmp_path_factory.mktemp("runs") / "moonlight"
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(run), "--data", corpus]) == 0
    return run


def test_convert_to_a_run_and_back_is_exact(hf_dir, corpus, converted, tmp_path):
    assert (converted / "checkpoints" / "0").is_dir()
    saved = json.loads((converted / "config.json").read_text())
    assert saved["train"]["tokenizer"] == "checkpoint" and saved["model"]["vocab_size"] == 320
    assert saved["init_from"]["format"] == "huggingface" and saved["train"]["data"] == [corpus]
    back = tmp_path / "back"
    assert main(["convert", "--to-hf", str(converted), "--out", str(back)]) == 0
    original, exported = _tensors(hf_dir), _tensors(back)
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (back / name).read_bytes() == (hf_dir / name).read_bytes()


def test_a_converted_run_is_written_whole_and_resumes_where_it_was_renamed(converted, capsys):
    """convert --from-hf trains its 0 steps in a partial folder next to --out, then
    renames it: nothing else is left there, config.json names --out, and `train
    --out OUT --resume` continues the renamed run (generate reads it: below)."""
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]
    assert json.loads((converted / "config.json").read_text())["train"]["out"] == str(converted)
    run = converted.parent / "resumed"  # a copy: the other tests read step 0
    shutil.copytree(converted, run)
    assert main(["train", "--out", str(run), "--resume", "--steps", "1", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["steps"] == 1
    shutil.rmtree(run)


def test_generate_from_a_run_or_a_checkpoint(hf_dir, converted, capsys):
    prompts = ["def main():", "import os\nimport"]
    args = ["--max-new-tokens", "5", *[a for p in prompts for a in ("--prompt", p)]]
    lines = {}
    for where in (converted, hf_dir):
        assert main(["generate", "--run", str(where), *args]) == 0
        lines[where] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[converted] == lines[hf_dir]
    tokenizer = CheckpointTokenizer(hf_dir)
    ids = [[tokenizer.bos_id, *map(int, p)] for p in tokenizer.encode(prompts)]
    want = generate(from_hf(hf_dir), ids, max_new_tokens=5, eos_id=tokenizer.end_id)
    assert [line["completion"] for line in lines[hf_dir]] == [tokenizer.decode(w) for w in want]
    assert [line["prompt"] for line in lines[hf_dir]] == prompts


def test_finetune_a_checkpoint_with_muon_on_a_mesh(hf_dir, tmp_path, capsys):
    """As Sec. 3.4 would with Moonlight: SFT from the checkpoint, Muon, sharded."""
    sft = tmp_path / "sft.jsonl"
    texts = load_corpus().texts[:40]
    sft.write_text(
        "".join(json.dumps({"prompt": t[:80], "response": t[80:200]}) + "\n" for t in texts)
    )
    out = tmp_path / "ft"
    args = ["train", "--init-from", str(hf_dir), "--data-format", "sft-jsonl"]
    args += ["--data", str(sft), "--optimizer", "muon", "--mesh", "data=2,expert=2,tensor=2"]
    args += ["--steps", "1", "--batch-size", "4", "--seq-len", "32", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["steps"] == 1 and np.isfinite(summary["loss"])
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    "args, match",
    [
        (["convert", "--from-hf", "{tmp}", "--out", "{tmp}/run"], "not a Hugging Face checkpoint"),
        (
            ["convert", "--to-hf", "{hf}", "--out", "{tmp}/x"],
            "is a Hugging Face checkpoint already",
        ),
        (["convert", "--to-hf", "{tmp}", "--out", "{hf}"], "exists; convert writes a new"),
        (["convert", "--from-hf", "{hf}", "--out", "{tmp}/r", "--step", "3"], "--step goes with"),
        (["convert", "--to-hf", "{tmp}", "--out", "{tmp}/r", "--data", "x"], "go with --from-hf"),
        (["generate", "--run", "{tmp}", "--prompt", "x"], "no config.json there"),
        (
            ["generate", "--run", "{run}", "--prompt", "x", "--step", "7"],
            "no checkpoint 7 (there: 0)",
        ),
        (
            ["train", "--init-from", "{hf}", "--tokenizer", "byte", "--out", "{tmp}/t"],
            "brings its tokenizer",
        ),
        (
            ["train", "--init-from", "{hf}", "--init-optimizer-state", "--out", "{tmp}/t"],
            "has no optimizer state",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(hf_dir, converted, tmp_path, capsys, args, match):
    args = [a.format(tmp=tmp_path, hf=hf_dir, run=converted) for a in args]
    before = sorted(tmp_path.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err
    assert sorted(tmp_path.rglob("*")) == before


def test_a_checkpoint_muonjax_cannot_express_is_exit_2(hf_dir, tmp_path, capsys):
    directory = tmp_path / "yarn"
    shutil.copytree(hf_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["rope_scaling"] = {"type": "yarn", "factor": 40.0}
    (directory / "config.json").write_text(json.dumps(config))
    assert main(["train", "--init-from", str(directory), "--out", str(tmp_path / "t")]) == 2
    assert "rotary scaling (e.g. YaRN)" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
