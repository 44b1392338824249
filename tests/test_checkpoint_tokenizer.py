"""CheckpointTokenizer on small tokenizer files written here: a `tokenizers` tokenizer.json,
and a Moonshot-style tiktoken.model with its tokenizer_config.json."""

import base64
import json

import numpy as np
import pytest
import tiktoken
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from muonjax.train.tokenizer import MOONSHOT_PATTERN, CheckpointTokenizer

CORPUS = ["the cat sat on the mat", "the dog ate the cat's food", "中文和English混合 123"] * 5
TEXTS = ["the cat ate", "中文English混合, 2024年 1234567!\n", "don't [EOS] stop </s>"]


def write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def added_token(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}  # fmt: skip


@pytest.fixture
def hf_dir(tmp_path):
    """A tokenizer.json that adds BOS itself, and a tokenizer_config.json naming EOS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    directory = tmp_path / "hf"
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    write_json(directory / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})
    return directory


def tiktoken_ranks():
    """All 256 bytes, then the prefixes of a few words as merges (each buildable by pairs)."""
    ranks = {bytes([b]): b for b in range(256)}
    for word in ["the", " the", " cat", " ate", "中文", "混合", "English", "123", " don"]:
        data = word.encode("utf-8")
        for n in range(2, len(data) + 1):
            ranks.setdefault(data[:n], len(ranks))
    return ranks


@pytest.fixture
def moonshot_dir(tmp_path):
    """tiktoken.model and a tokenizer_config.json laid out as Moonlight's."""
    ranks = tiktoken_ranks()
    directory = tmp_path / "moonshot"
    directory.mkdir()
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items()]
    (directory / "tiktoken.model").write_text("\n".join(lines) + "\n")
    n = len(ranks)
    config = {
        "added_tokens_decoder": {str(n): added_token("[BOS]"), str(n + 1): added_token("[EOS]")},
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
    }
    write_json(directory / "tokenizer_config.json", config)
    write_json(directory / "special_tokens_map.json", {"eos_token": "[EOS]"})
    return directory


def test_tokenizer_json(hf_dir):
    tokenizer = CheckpointTokenizer(hf_dir)
    reference = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    texts = TEXTS[:2]
    for ids, text in zip(tokenizer.encode(texts), texts):
        assert ids.tolist() == reference.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids) == reference.decode(ids.tolist()) == text
    eos, bos = reference.token_to_id("</s>"), reference.token_to_id("<s>")
    assert (tokenizer.end_id, tokenizer.bos_id) == (eos, bos)
    assert tokenizer.add_bos  # its post-processor adds <s>; encode leaves that to the caller
    assert tokenizer.vocab_size == reference.get_vocab_size()
    # "</s>" in user text is text, and decodes back to it
    (ids,) = tokenizer.encode(["stop </s>"])
    assert eos not in ids.tolist() and tokenizer.decode(ids) == "stop </s>"
    assert tokenizer.decode([eos]) == "</s>"


def test_tiktoken_model(moonshot_dir):
    tokenizer = CheckpointTokenizer(moonshot_dir)
    ranks = tiktoken_ranks()
    n = len(ranks)
    reference = tiktoken.Encoding(
        "reference",
        pat_str=MOONSHOT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"[BOS]": n, "[EOS]": n + 1},
    )
    for ids, text in zip(tokenizer.encode(TEXTS), TEXTS):
        assert ids.tolist() == reference.encode(text, disallowed_special=())
        assert tokenizer.decode(ids) == text
        assert n + 1 not in ids.tolist()  # "[EOS]" in user text is not the special id
    (ids,) = tokenizer.encode(["中文English"])
    assert len(ids) == 2  # the merges apply
    assert (tokenizer.end_id, tokenizer.bos_id, tokenizer.add_bos) == (n + 1, n, False)
    assert tokenizer.vocab_size == n + 256  # Moonshot reserves 256 special ids
    assert tokenizer.decode([n + 1]) == "[EOS]"
    assert tokenizer.decode(np.array([n, 97, n + 7])) == f"[BOS]a<|reserved_token_{n + 7}|>"


def pieces(text):
    """How MOONSHOT_PATTERN splits `text` in tiktoken: with every substring of `text` a
    token, BPE merges each piece into one token and no further."""
    data = text.encode("utf-8")
    ranks = {bytes([b]): b for b in range(256)}
    substrings = {data[i:j] for i in range(len(data)) for j in range(i + 2, len(data) + 1)}
    for token in sorted(substrings, key=lambda s: (len(s), s)):
        ranks[token] = len(ranks)
    encoding = tiktoken.Encoding("pieces", pat_str=MOONSHOT_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={})  # fmt: skip
    tokens = encoding.encode_ordinary(text)
    return [encoding.decode_single_token_bytes(t).decode("utf-8") for t in tokens]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1234567", ["123", "456", "7"]),  # digits in groups of at most 3
        ("2024年", ["202", "4", "年"]),
        ("中文English混合", ["中文", "English", "混合"]),  # Han runs apart from other letters
        ("北京市 Pascal", ["北京市", " Pascal"]),
        ("I don't know", ["I", " don't", " know"]),  # the contraction stays with its word
        ("WE'LL see", ["WE'LL", " see"]),
        ("CamelCase", ["Camel", "Case"]),
        ("你好, world!\n\nok", ["你好", ",", " world", "!\n\n", "ok"]),
        ("a   b", ["a", "  ", " b"]),
    ],
)
def test_moonshot_pattern(text, expected):
    assert pieces(text) == expected


@pytest.mark.parametrize("kind", ["hf_dir", "moonshot_dir"])
def test_save_and_load(kind, request, tmp_path):
    tokenizer = CheckpointTokenizer(request.getfixturevalue(kind))
    out = tmp_path / "run"
    out.mkdir()
    tokenizer.save(out)
    assert not list(out.glob("*.tmp"))
    copy = CheckpointTokenizer(out)
    assert [i.tolist() for i in copy.encode(TEXTS)] == [i.tolist() for i in tokenizer.encode(TEXTS)]
    for name in ("vocab_size", "end_id", "bos_id", "add_bos"):
        assert getattr(copy, name) == getattr(tokenizer, name)
    if kind == "moonshot_dir":
        assert (out / "special_tokens_map.json").is_file()


def test_eos_from_model_config_survives_save(hf_dir, tmp_path):
    """A config.json's eos_token_id, when tokenizer_config.json names none, is named in the
    tokenizer_config.json that save writes (a run folder's config.json is muonjax's own)."""
    write_json(hf_dir / "tokenizer_config.json", {"add_bos_token": False})
    eos = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).token_to_id("</s>")
    write_json(hf_dir / "config.json", {"eos_token_id": [eos], "bos_token_id": None})
    tokenizer = CheckpointTokenizer(hf_dir)
    assert (tokenizer.end_id, tokenizer.bos_id, tokenizer.add_bos) == (eos, None, False)
    out = tmp_path / "run"
    out.mkdir()
    write_json(out / "config.json", {"train": {}, "model": {}})
    tokenizer.save(out)
    copy = CheckpointTokenizer(out)
    assert (copy.end_id, copy.bos_id, copy.add_bos) == (eos, None, False)


def test_bad_eos(hf_dir):
    write_json(hf_dir / "tokenizer_config.json", {"eos_token": "<eos>"})
    with pytest.raises(ValueError, match="'<eos>' is not in the vocabulary"):
        CheckpointTokenizer(hf_dir)
    write_json(hf_dir / "tokenizer_config.json", {})
    write_json(hf_dir / "config.json", {"eos_token_id": 10**6})
    with pytest.raises(ValueError, match="outside"):
        CheckpointTokenizer(hf_dir)


def test_no_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json and tiktoken.model") as error:
        CheckpointTokenizer(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_bad_tiktoken_model(moonshot_dir):
    (moonshot_dir / "tiktoken.model").write_text("YQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match="line 2"):
        CheckpointTokenizer(moonshot_dir)


def test_a_tokenizer_json_alone_is_saved_as_a_checkpoints(hf_dir, tmp_path):
    """With no tokenizer_config.json to copy, save writes one: a run folder's
    tokenizer.json alone would read as a BPE the run trained itself."""
    from muonjax.train.tokenizer import has_checkpoint_tokenizer

    (hf_dir / "tokenizer_config.json").unlink()
    out = tmp_path / "run"
    out.mkdir()
    CheckpointTokenizer(hf_dir).save(out)
    assert has_checkpoint_tokenizer(out)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
