"""The text a run trains on: files, folders or globs, or by default the Python
standard library's own source, read in a fixed order and fingerprinted; or, for
fine-tuning (--data-format sft-jsonl), prompt/response examples from JSONL files.
`tokenize` makes its training and validation token streams (which data.py trains
on and shards.py writes)."""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import pathlib
import sysconfig

import numpy as np

from muonjax.train.config import TrainConfig
from muonjax.train.errors import ConfigError
from muonjax.train.tokenizer import encode_examples, tokenizer_for_run

# Left out of the default corpus: third-party code, and the test suites,
# which hold deliberately mis-encoded files.
_STDLIB_SKIP = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


@dataclasses.dataclass(frozen=True)
class Corpus:
    texts: tuple[str, ...]
    paths: tuple[str, ...]
    # sha256 over the files' bytes, in order: what a run computes from, not where the
    # files lie (a resumed run may spell --data differently, or the files may move)
    fingerprint: str

    def summary(self) -> dict:
        return {
            "files": len(self.paths),
            "characters": sum(len(t) for t in self.texts),
            "fingerprint": self.fingerprint,
            "first": self.paths[0],
            "last": self.paths[-1],
        }


def stdlib_files() -> tuple[pathlib.Path, list[pathlib.Path]]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not _STDLIB_SKIP & set(p.relative_to(root).parts)
    )
    return root, files


def _user_files(patterns: tuple[str, ...]) -> list[pathlib.Path]:
    files = []
    for pattern in patterns:
        path = pathlib.Path(pattern)
        if path.is_file():
            matched = [path]
        elif path.is_dir():
            matched = sorted(
                p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            )
            if not matched:
                raise ConfigError(f"--data folder {pattern} holds no files")
        else:
            matched = sorted(pathlib.Path(p) for p in glob.glob(pattern, recursive=True))
            matched = [p for p in matched if p.is_file()]
            if not matched:
                raise ConfigError(f"--data {pattern} is not a file or folder and matches no file")
        files.extend(matched)
    return files


def _decode(path: pathlib.Path, data: bytes) -> str:
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(
            f"--data file {path} looks binary (NUL byte at offset {nul}); pass text files"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"--data file {path} is not UTF-8 text (invalid byte at offset {e.start})"
        ) from None


def _add(digest, data: bytes) -> None:
    """One file into a fingerprint: its length, then its bytes (so that where one
    file ends and the next begins counts, as it does for the token streams)."""
    digest.update(len(data).to_bytes(8, "little") + data)


def load_corpus(patterns: tuple[str, ...] = ()) -> Corpus:
    """Reads the corpus; user files must be non-empty UTF-8 text."""
    if not patterns:
        return _stdlib_corpus()
    digest = hashlib.sha256()
    texts, paths = [], []
    for path in _user_files(patterns):
        data = path.read_bytes()
        texts.append(_decode(path, data))
        paths.append(str(path))
        _add(digest, data)
    if not any(texts):
        raise ConfigError(f"--data {' '.join(patterns)} holds no text (all files are empty)")
    return Corpus(texts=tuple(texts), paths=tuple(paths), fingerprint=digest.hexdigest())


@functools.cache
def _stdlib_corpus() -> Corpus:
    """The default corpus, read once per process (the installed library does not
    change under a running process; sweeps and tests start many runs)."""
    digest = hashlib.sha256()
    texts, paths = [], []
    root, files = stdlib_files()
    for path in files:
        data = path.read_bytes()
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        relative = str(path.relative_to(root))
        paths.append(relative)
        _add(digest, data)
    return Corpus(texts=tuple(texts), paths=tuple(paths), fingerprint=digest.hexdigest())


def split_texts(texts: tuple[str, ...], validation_fraction: float) -> tuple[list[str], list[str]]:
    """The last `validation_fraction` of the characters, in corpus order, held out."""
    total = sum(len(t) for t in texts)
    cut = round(total * (1 - validation_fraction))
    train, validation, seen = [], [], 0
    for text in texts:
        if seen + len(text) <= cut:
            train.append(text)
        elif seen >= cut:
            validation.append(text)
        else:
            train.append(text[: cut - seen])
            validation.append(text[cut - seen :])
        seen += len(text)
    return train, validation


@dataclasses.dataclass(frozen=True)
class Examples:
    """Prompt/response pairs (--data-format sft-jsonl), in file and line order."""

    pairs: tuple[tuple[str, str], ...]
    paths: tuple[str, ...]
    fingerprint: str  # sha256 over the files' bytes, in order, as for Corpus

    def summary(self) -> dict:
        return {
            "files": len(self.paths),
            "examples": len(self.pairs),
            "characters": sum(len(p) + len(r) for p, r in self.pairs),
            "fingerprint": self.fingerprint,
            "first": self.paths[0],
            "last": self.paths[-1],
        }


def _examples_in(path: pathlib.Path, text: str) -> list[tuple[str, str]]:
    """One {"prompt": str, "response": str} object per non-blank line; other keys
    are ignored. Split on "\n" only: JSON strings may hold U+2028 and the like."""
    pairs = []
    for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        if not line.strip():
            continue
        where = f"--data {path} line {number}"
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(example, dict):
            raise ConfigError(
                f"{where} is a JSON {type(example).__name__}, "
                'not an object {"prompt": ..., "response": ...}'
            )
        for key in ("prompt", "response"):
            if key not in example:
                raise ConfigError(f'{where} has no "{key}" (keys: {", ".join(example) or "none"})')
            if not isinstance(example[key], str):
                raise ConfigError(
                    f'{where}: "{key}" must be a string, got {type(example[key]).__name__}'
                )
        pairs.append((example["prompt"], example["response"]))
    return pairs


def load_examples(patterns: tuple[str, ...]) -> Examples:
    """Reads --data-format sft-jsonl files (UTF-8, blank lines skipped)."""
    if not patterns:
        raise ConfigError(
            "--data-format sft-jsonl needs --data: "
            'JSONL files of {"prompt": ..., "response": ...} lines'
        )
    digest = hashlib.sha256()
    pairs, paths = [], []
    for path in _user_files(patterns):
        data = path.read_bytes()
        pairs.extend(_examples_in(path, _decode(path, data)))
        paths.append(str(path))
        _add(digest, data)
    if not pairs:
        raise ConfigError(f"--data {' '.join(patterns)} holds no examples (every line is blank)")
    return Examples(pairs=tuple(pairs), paths=tuple(paths), fingerprint=digest.hexdigest())


def split_examples(pairs, validation_fraction: float) -> tuple[list, list]:
    """The last `validation_fraction` of the examples, in file order, held out."""
    cut = round(len(pairs) * (1 - validation_fraction))
    return list(pairs[:cut]), list(pairs[cut:])


def tokenize(config: TrainConfig, out: pathlib.Path, source: pathlib.Path | None = None):
    """(train tokens, validation tokens, tokenizer, description) of config.data:
    the corpus (text or SFT examples) split and tokenized; `source`: the run an
    --init-from run fine-tunes, whose BPE tokenizer it uses."""
    if config.data_format == "sft-jsonl":  # prompt tokens stored as -(id + 1): not targets
        corpus = load_examples(config.data)
        train_pairs, validation_pairs = split_examples(corpus.pairs, config.validation_fraction)
        bpe_texts = [text for pair in train_pairs for text in pair]
        tokenizer = _tokenizer(config, out, bpe_texts, source)
        train, validation = (encode_examples(tokenizer, p) for p in (train_pairs, validation_pairs))
        sft = {
            "train_examples": len(train_pairs),
            "validation_examples": len(validation_pairs),
            "train_target_tokens": int(np.sum(train >= 0)),
            "validation_target_tokens": int(np.sum(validation >= 0)),
        }
    else:
        corpus, sft = load_corpus(config.data), {}
        train_texts, validation_texts = split_texts(corpus.texts, config.validation_fraction)
        tokenizer = _tokenizer(config, out, train_texts, source)
        train, validation = (
            np.concatenate([np.zeros(0, np.uint8), *tokenizer.encode(t)])
            for t in (train_texts, validation_texts)
        )
    description = {
        **corpus.summary(),
        "tokenizer": config.tokenizer,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": int(len(train)),
        "validation_tokens": int(len(validation)),
        **sft,
    }
    return train, validation, tokenizer, description


def _tokenizer(config: TrainConfig, out: pathlib.Path, texts, source: pathlib.Path | None):
    try:
        return tokenizer_for_run(config.tokenizer, out, texts, config.bpe_vocab_size, source)
    except ValueError as e:  # a checkpoint's tokenizer files that cannot be read
        raise ConfigError(str(e)) from None
