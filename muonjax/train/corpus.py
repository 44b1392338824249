"""The text a run trains on: files, folders or globs, or by default the Python
standard library's own source (--corpus python: and every installed package's,
python_corpus.py), read in a fixed order and fingerprinted; or, for
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
from muonjax.train.python_corpus import distribution_files, site_dirs
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
    # ((name, version), ...) of the installed packages read (--corpus python), to rebuild it
    distributions: tuple[tuple[str, str], ...] = ()

    def summary(self) -> dict:
        return {
            "files": len(self.paths),
            "characters": sum(len(t) for t in self.texts),
            "fingerprint": self.fingerprint,
            "first": self.paths[0],
            "last": self.paths[-1],
            **({"distributions": dict(self.distributions)} if self.distributions else {}),
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


def fingerprint_add(digest, data: bytes) -> None:
    """One file into a fingerprint: its length, then its bytes (so that where one
    file ends and the next begins counts, as it does for the token streams)."""
    digest.update(len(data).to_bytes(8, "little") + data)


def load_corpus(patterns: tuple[str, ...] = (), corpus: str = "stdlib") -> Corpus:
    """Reads the corpus: the user's files, which must be non-empty UTF-8 text, or
    else the built-in `corpus` (config.CORPORA; python: python_corpus.py)."""
    if not patterns:
        if corpus == "python":
            return python_corpus()
        return _stdlib_corpus()
    digest = hashlib.sha256()
    texts, paths = [], []
    for path in _user_files(patterns):
        data = path.read_bytes()
        texts.append(_decode(path, data))
        paths.append(str(path))
        fingerprint_add(digest, data)
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
        fingerprint_add(digest, data)
    return Corpus(texts=tuple(texts), paths=tuple(paths), fingerprint=digest.hexdigest())


def read_python_corpus(roots: tuple[pathlib.Path, ...]) -> Corpus:
    """The standard-library corpus followed by the distributions' files in `roots`
    (see the module's docstring), fingerprinted over every file's bytes in order."""
    stdlib = _stdlib_corpus()
    digest = hashlib.sha256()
    for text in stdlib.texts:  # UTF-8 round-trips exactly: these are the files' bytes
        fingerprint_add(digest, text.encode("utf-8"))
    texts, paths, versions = list(stdlib.texts), list(stdlib.paths), {}
    for name, version, files in distribution_files(roots):
        for relative, path in files:
            data = path.read_bytes()
            if b"\0" in data:
                continue
            try:
                texts.append(data.decode("utf-8"))
            except UnicodeDecodeError:
                continue
            paths.append(relative)
            fingerprint_add(digest, data)
            versions[name] = version
    return Corpus(
        texts=tuple(texts),
        paths=tuple(paths),
        fingerprint=digest.hexdigest(),
        distributions=tuple(versions.items()),
    )


def python_corpus() -> Corpus:
    """The "python" corpus of this environment, read once per process."""
    return _read_once(site_dirs())


@functools.cache
def _read_once(roots: tuple[pathlib.Path, ...]) -> Corpus:
    # the installed packages do not change under a running process; sweeps and
    # tests start many runs
    return read_python_corpus(roots)


def _order(keys: list[bytes], holdout: str) -> list[int]:
    """Corpus order for "tail"; for "documents", the order of the documents'
    sha256 (identical documents side by side, so they fall on the same side of
    the cut but for the one document it passes through)."""
    order = list(range(len(keys)))
    if holdout == "documents":
        order.sort(key=lambda i: (hashlib.sha256(keys[i]).digest(), i))
    return order


def split_texts(
    texts: tuple[str, ...], validation_fraction: float, holdout: str = "documents"
) -> tuple[list[str], list[str]]:
    """(training texts in corpus order, held-out texts): the last
    `validation_fraction` of the characters in `_order` held out. "documents"
    holds out whole files chosen by content hash, so the held-out text spreads
    over the corpus; the one file the cut passes through gives its start to
    training and its end to the held-out part (a corpus of one file is split so).
    "tail" holds out the end of the corpus, as runs made before --holdout did."""
    order = _order([t.encode() for t in texts], holdout)
    cut = round(sum(len(t) for t in texts) * (1 - validation_fraction))
    train, validation, seen = {}, [], 0
    for i in order:
        text = texts[i]
        if seen + len(text) <= cut:
            train[i] = text
        elif seen >= cut:
            validation.append(text)
        else:
            train[i] = text[: cut - seen]
            validation.append(text[cut - seen :])
        seen += len(text)
    return [train[i] for i in sorted(train)], validation


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
        fingerprint_add(digest, data)
    if not pairs:
        raise ConfigError(f"--data {' '.join(patterns)} holds no examples (every line is blank)")
    return Examples(pairs=tuple(pairs), paths=tuple(paths), fingerprint=digest.hexdigest())


def split_examples(pairs, validation_fraction: float, holdout: str = "documents"):
    """(training pairs in file order, held-out pairs): the last `validation_fraction`
    of the examples in `_order` (by each pair's hash for "documents", file order
    for "tail")."""
    order = _order([json.dumps(pair).encode() for pair in pairs], holdout)
    held = set(order[round(len(pairs) * (1 - validation_fraction)) :])
    train = [pair for i, pair in enumerate(pairs) if i not in held]
    return train, [pairs[i] for i in sorted(held)]


def tokenize(config: TrainConfig, out: pathlib.Path, source: pathlib.Path | None = None):
    """(train tokens, validation tokens, tokenizer, description) of config.data:
    the corpus (text or SFT examples) split and tokenized; `source`: the run an
    --init-from run fine-tunes, whose BPE tokenizer it uses."""
    if config.data_format == "sft-jsonl":  # prompt tokens stored as -(id + 1): not targets
        corpus = load_examples(config.data)
        train_pairs, validation_pairs = split_examples(
            corpus.pairs, config.validation_fraction, config.holdout
        )
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
        corpus, sft = load_corpus(config.data, config.corpus), {}
        train_texts, validation_texts = split_texts(
            corpus.texts, config.validation_fraction, config.holdout
        )
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
