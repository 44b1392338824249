"""Tokenizers that need nothing downloaded: raw UTF-8 bytes, a byte-level BPE
trained on the run's own training text and saved with the run, or the tokenizer
files of a checkpoint directory; and the token stream of prompt/response
examples for fine-tuning."""

from __future__ import annotations

import base64
import json
import pathlib

import numpy as np

BPE_FILE = "tokenizer.json"

# The end of an example: the byte 0xFF, which UTF-8 text never contains, so it
# cannot be confused with text (a "\n" could end a line inside a response) and
# needs no extra vocabulary: every tokenizer here has a token for each byte.
END_BYTE = 0xFF


class ByteTokenizer:
    vocab_size = 256
    end_id = END_BYTE
    bos_id, add_bos = None, False

    def save(self, path: pathlib.Path) -> None:
        """Nothing to save: bytes are bytes."""

    def encode(self, texts) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, np.uint8)).decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library."""

    bos_id, add_bos = None, False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        # byte-level BPE spells byte 0xFF as the character U+00FF (GPT-2's byte map)
        self.end_id = tokenizer.token_to_id(chr(END_BYTE))

    @classmethod
    def train(cls, texts, vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: pathlib.Path) -> BPETokenizer:
        return cls(_tokenizer_file(path))

    def save(self, path: pathlib.Path) -> None:
        """Writes <path>/tokenizer.json whole or not at all (a temporary file, renamed)."""
        tmp = path / f"{BPE_FILE}.tmp"
        self._tokenizer.save(str(tmp))
        tmp.replace(path / BPE_FILE)

    def encode(self, texts) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.uint32) for e in self._tokenizer.encode_batch(list(texts))]

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


def tokenizer_for_run(
    kind: str,
    out: pathlib.Path,
    train_texts,
    bpe_vocab_size: int,
    source: pathlib.Path | None = None,
):
    """The run's tokenizer: bytes; or the BPE saved in `out` by an earlier start
    of the run, else the one of the run it fine-tunes (`source`), else a BPE
    trained on `train_texts` (save it with `.save`); or "checkpoint": the
    checkpoint tokenizer in `out`, else in `source`."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "checkpoint":
        for folder in (out, source):
            if folder is not None and has_checkpoint_tokenizer(folder):
                return CheckpointTokenizer(folder)
        where = f"--init-from {source}" if source is not None else "no --init-from"
        raise ValueError(
            f"--tokenizer checkpoint: {where} holds neither {BPE_FILE} with "
            f"{TOKENIZER_CONFIG_FILE} nor {TIKTOKEN_FILE} (it takes the tokenizer of the "
            "checkpoint a run starts from)"
        )
    for folder in (out, source):
        if folder is not None and (folder / BPE_FILE).exists():
            return BPETokenizer.load(folder / BPE_FILE)
    return BPETokenizer.train(train_texts, bpe_vocab_size)


def encode_examples(tokenizer, pairs) -> np.ndarray:
    """Prompt/response examples packed, in order, into one int32 stream: per
    example the prompt's tokens stored as -(id + 1) (input only: the model reads
    them, the loss does not predict them), then the response's tokens and the
    end token (END_BYTE) as ids, the targets. Prompt and response are encoded
    separately, so their boundary is a token boundary."""
    prompts = tokenizer.encode([p for p, _ in pairs])
    responses = tokenizer.encode([r for _, r in pairs])
    end = np.array([] if tokenizer.end_id is None else [tokenizer.end_id], np.int32)
    parts = [np.zeros(0, np.int32)]
    for prompt, response in zip(prompts, responses):
        parts += [-1 - prompt.astype(np.int32), response.astype(np.int32), end]
    return np.concatenate(parts)


# A Hugging Face checkpoint's tokenizer: its `tokenizer.json`, or Moonshot's tiktoken
# ranks (Moonlight, Kimi) with the special tokens of its tokenizer_config.json.
TIKTOKEN_FILE = "tiktoken.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
MODEL_CONFIG_FILE = "config.json"

# Moonshot's pre-tokenization regex: `pat_str` of TikTokenTokenizer in
# tokenization_moonshot.py, shipped with moonshotai/Moonlight-16B-A3B(-Instruct) (the same
# in Kimi K2's tokenization_kimi.py; transcribed as in github.com/North-Shore-AI/tiktoken_ex
# oracle/kimi_oracle.py and lib/tiktoken_ex/kimi.ex). A tiktoken.model holds only the ranks,
# and text split differently tokenizes differently, so the pattern is reproduced exactly,
# not run from the checkpoint's code. Han runs are their own pieces: the letter classes
# subtract Han (`&&[^\p{Han}]`, which tiktoken's regex engine supports).
MOONSHOT_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
# Moonshot's tokenizer reserves this many special ids right after the BPE ranks.
MOONSHOT_NUM_SPECIAL = 256


def _tokenizer_file(path: pathlib.Path):
    """The `tokenizers` Tokenizer saved in `path`; ValueError naming the file if it
    does not load (the library raises a plain Exception for a damaged file)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 -- see above
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path} is not a tokenizer the tokenizers library loads ({reason})"
        ) from None


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_tiktoken_ranks(path: pathlib.Path) -> dict[bytes, int]:
    """The BPE ranks of a tiktoken file: lines of base64(token bytes) and rank."""
    # What tiktoken.load.load_tiktoken_bpe parses, without its cache: that one keeps a copy
    # of each file under the temporary folder keyed by the file's path, and returns the
    # copy even after the file at that path has changed.
    ranks = {}
    for number, line in enumerate(pathlib.Path(path).read_bytes().splitlines(), 1):
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:  # binascii.Error is a ValueError
                raise ValueError(f"{path}, line {number}: not base64 and a rank") from e
    return ranks


def moonshot_encoding(ranks: dict[bytes, int], tokenizer_config: dict, name: str = "moonshot"):
    """tiktoken.Encoding of Moonshot's tokenizer: `ranks`, its pattern and its special ids."""
    import tiktoken

    # As tokenization_moonshot.py: the ids after the ranks, named by added_tokens_decoder,
    # else "<|reserved_token_{id}|>"; entries outside that range are ignored there too.
    named = {
        int(i): token["content"]
        for i, token in tokenizer_config.get("added_tokens_decoder", {}).items()
    }
    first = len(ranks)
    specials = {
        named.get(i, f"<|reserved_token_{i}|>"): i
        for i in range(first, first + MOONSHOT_NUM_SPECIAL)
    }
    return tiktoken.Encoding(
        name, pat_str=MOONSHOT_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )


def has_checkpoint_tokenizer(directory) -> bool:
    """Whether `directory` holds a checkpoint tokenizer's files (a run directory with
    a trained BPE holds tokenizer.json alone: not one)."""
    directory = pathlib.Path(directory)
    return (directory / TIKTOKEN_FILE).is_file() or (
        (directory / BPE_FILE).is_file() and (directory / TOKENIZER_CONFIG_FILE).is_file()
    )


class CheckpointTokenizer:
    """The tokenizer a checkpoint directory ships, loaded without running its code.

    `CheckpointTokenizer(directory)` loads `tokenizer.json` (the `tokenizers` library's
    format) if the directory has one, else `tiktoken.model` as Moonshot's tokenizer. `encode`
    adds no BOS (`add_bos` says whether the checkpoint's tokenizer does: the caller decides)
    and encodes text spelling a special token as plain text, so data cannot inject control
    tokens; `decode` spells special tokens out. `end_id` is the EOS token's id.
    """

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        self._config = _read_json(self.directory / TOKENIZER_CONFIG_FILE)
        self._tokenizer = self._encoding = None
        if (self.directory / BPE_FILE).is_file():
            self.model_file = BPE_FILE
            self._tokenizer = _tokenizer_file(self.directory / BPE_FILE)
            self._tokenizer.encode_special_tokens = True  # special tokens' text is text
            vocab = self._tokenizer.get_vocab(with_added_tokens=True)
            self.vocab_size = max(vocab.values()) + 1
        elif (self.directory / TIKTOKEN_FILE).is_file():
            self.model_file = TIKTOKEN_FILE
            ranks = read_tiktoken_ranks(self.directory / TIKTOKEN_FILE)
            self._encoding = moonshot_encoding(ranks, self._config, self.directory.name)
            self.vocab_size = self._encoding.n_vocab
        else:
            raise ValueError(
                f"{self.directory} holds no tokenizer: looked for {BPE_FILE} and {TIKTOKEN_FILE}"
            )
        # bos/eos: named by tokenizer_config.json (or special_tokens_map.json), else the
        # ids of a Hugging Face config.json (a muonjax run's config.json has none)
        names = {**_read_json(self.directory / SPECIAL_TOKENS_MAP_FILE), **self._config}
        model_config = _read_json(self.directory / MODEL_CONFIG_FILE)
        self._names = {}
        self.bos_id = self._special_id("bos", names, model_config)
        self.end_id = self._special_id("eos", names, model_config)
        if "add_bos_token" in self._config:
            self.add_bos = bool(self._config["add_bos_token"])
        elif self._tokenizer is not None and self.bos_id is not None:
            # tokenizer.json's post-processor is what adds BOS there
            self.add_bos = self._tokenizer.encode("").ids[:1] == [self.bos_id]
        else:
            self.add_bos = False  # Moonshot's tokenizer adds none

    def _special_id(self, kind: str, names: dict, model_config: dict) -> int | None:
        key = f"{kind}_token"
        name = names.get(key)
        name = name.get("content") if isinstance(name, dict) else name
        if name is not None:
            i = self._token_id(name)
            if i is None:
                raise ValueError(f"{self.directory}: {key} {name!r} is not in the vocabulary")
            return i
        i = model_config.get(f"{kind}_token_id")
        i = (i or [None])[0] if isinstance(i, list) else i
        if i is None:
            return None
        if not 0 <= i < self.vocab_size:
            raise ValueError(
                f"{self.directory}: {MODEL_CONFIG_FILE}'s {kind}_token_id {i} is outside "
                f"the tokenizer's {self.vocab_size} ids"
            )
        # named in the tokenizer_config.json that save writes, so the copy needs no config.json
        self._names[key] = self._token_name(i)
        return i

    def _token_id(self, name: str) -> int | None:
        if self._tokenizer is not None:
            return self._tokenizer.token_to_id(name)
        try:
            return self._encoding.encode_single_token(name)
        except KeyError:
            return None

    def _token_name(self, i: int) -> str | None:
        if self._tokenizer is not None:
            return self._tokenizer.id_to_token(i)
        try:
            return self._encoding.decode_single_token_bytes(i).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            return None  # not a whole character: the copy has no bos/eos name for it

    def save(self, path: pathlib.Path) -> None:
        """Copies the tokenizer's files into `path`, each whole or not at all (a temporary
        file, renamed)."""
        path = pathlib.Path(path)
        names = {k: v for k, v in self._names.items() if v is not None}
        for name in (self.model_file, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
            source = self.directory / name
            if name == TOKENIZER_CONFIG_FILE and (names or not source.is_file()):
                # always one: it marks a run directory's tokenizer.json as a checkpoint's
                data = json.dumps({**self._config, **names}, indent=2, ensure_ascii=False)
                data = data.encode("utf-8")
            elif source.is_file():
                data = source.read_bytes()
            else:
                continue
            tmp = path / f"{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(path / name)

    def encode(self, texts) -> list[np.ndarray]:
        texts = list(texts)
        if self._encoding is not None:
            ids = self._encoding.encode_ordinary_batch(texts)  # no special tokens
        else:
            encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
            ids = [e.ids for e in encodings]
        return [np.asarray(i, np.uint32) for i in ids]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._encoding is not None:
            return self._encoding.decode(ids)
        return self._tokenizer.decode(ids, skip_special_tokens=False)
