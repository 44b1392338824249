"""Pre-tokenized data: ArrayRecord shards (grain's native format) and a manifest.

`muonjax tokenize` reads and tokenizes a corpus once and writes DIR/:

    manifest.json                       tokenizer, token counts, layout, source fingerprint
    tokenizer.json                      with --tokenizer bpe
    train-00000-of-00003.array_record   the training token stream, in records of
    ...                                 RECORD_TOKENS tokens (the last one shorter)
    validation-00000-of-00001.array_record

`muonjax train --data DIR` then reads each window of seq_len + 1 tokens from
the records that hold it (one or two), so a process trains on only the windows
of its own rows of each batch, and start-up does not grow with the dataset
(the integrity check, which reads every record once, runs in the background for
a large folder: muonjax/train/integrity.py). The token streams are exactly the
text path's (the same split, tokenizer and order), so a run trains on the same
batches either way.

The folder is untrusted input: the manifest is checked whole before use
(`read_manifest`), every file it names is a plain name inside the folder (a
symbolic link there is followed: its owner made it), and only regular files are
opened (a FIFO would block).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re

import numpy as np

from muonjax.files import NotRegularFile, is_plain_name, regular_file_size, written_whole
from muonjax.train.config import (
    DATA_FORMATS,
    HOLDOUTS,
    SAVED_BEFORE,
    TOKENIZATION_FIELDS,
    TrainConfig,
    flag_name,
)
from muonjax.train.corpus import tokenize
from muonjax.train.errors import ConfigError, WriteFailed

MANIFEST = "manifest.json"
FORMAT = "muonjax-tokens/1"
RECORD_TOKENS = 4096  # a window of up to 4097 tokens spans at most two records
SHARD_TOKENS = 2**26  # tokens per shard file: 64-256 MiB
SPLITS = ("train", "validation")
DTYPES = ("|u1", "<u2", "<i4")  # the stream dtypes _stream_dtype writes (numpy's dtype.str)


def is_shards(data: tuple[str, ...]) -> bool:
    """Whether --data names one folder written by `muonjax tokenize`: one holding a
    manifest.json, of whatever kind (read_manifest refuses one that is not a file)."""
    return len(data) == 1 and os.path.lexists(pathlib.Path(data[0]) / MANIFEST)


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of the shards folder `directory`, checked whole (_check_schema)."""
    where = f"--data {directory}"
    path = pathlib.Path(directory) / MANIFEST
    check_regular(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(
            f"{where}: {MANIFEST} is not a muonjax tokenize manifest "
            f"(format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
            f"expected {FORMAT!r}); run muonjax tokenize again"
        )
    if isinstance(manifest.get("config"), dict):  # made before a field existed: as it was
        saved_before = {k: v for k, v in SAVED_BEFORE.items() if k in TOKENIZATION_FIELDS}
        manifest["config"] = {**saved_before, **manifest["config"]}
    _check_schema(manifest, f"{where}: {MANIFEST}")
    return manifest


def check_regular(path: pathlib.Path) -> None:
    """`path`, a file of a shards folder, is a regular file (files.regular_file_size),
    else a ConfigError naming it."""
    try:
        regular_file_size(path)
    except NotRegularFile as e:
        raise ConfigError(f"--data {e}") from None


def _integer(least: int):
    """The rule of an integer key: its check and what is valid, in words."""
    return lambda v: type(v) is int and v >= least, f"an integer >= {least}"


# Each key of the manifest with its rule (a check of the value, and what is valid in
# words), or None for an object checked by its own table.
_MANIFEST_KEYS = {"format": None, "config": None, "vocab_size": _integer(1),
                  "record_tokens": _integer(1), "splits": None, "source": None}  # fmt: skip
_CONFIG_KEYS = {  # the ranges of --bpe-vocab-size and --validation-fraction: TrainConfig's
    "data_format": (lambda v: v in DATA_FORMATS, " or ".join(map(repr, DATA_FORMATS))),
    "tokenizer": (lambda v: v in ("byte", "bpe"), "'byte' or 'bpe'"),
    "bpe_vocab_size": _integer(1),
    "validation_fraction": (lambda v: type(v) in (int, float), "a number"),
    "holdout": (lambda v: v in HOLDOUTS, " or ".join(map(repr, HOLDOUTS))),
}
_SPLIT_KEYS = {
    "tokens": _integer(0),
    "dtype": (lambda v: v in DTYPES, " or ".join(map(repr, DTYPES))),
    "shards": (lambda v: type(v) is list and len(v) > 0, "a non-empty list of file names"),
    "sha256": (lambda v: type(v) is str and re.fullmatch("[0-9a-f]{64}", v), "64 hex digits"),
}


def _check_object(value, keys: dict, where: str, name: str = "") -> None:
    """`value` (the manifest's entry `name`, "" for the whole) is a JSON object with
    exactly `keys`, each valid by its rule."""
    again = "run muonjax tokenize again"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {name} is not a JSON object; {again}")
    missing, unknown = set(keys) - set(value), set(value) - set(keys)
    if missing or unknown:
        wrong = [f"lacks {', '.join(sorted(missing))}"] if missing else []
        wrong += [f"has unknown {', '.join(sorted(unknown))}"] if unknown else []
        raise ConfigError(
            f"{where}: {name or 'the manifest'} {' and '.join(wrong)} "
            f"(valid keys: {', '.join(keys)}); {again}"
        )
    for key, rule in keys.items():
        if rule is not None and not rule[0](value[key]):
            raise ConfigError(
                f"{where}: {name + '.' if name else ''}{key} is {value[key]!r}; valid: {rule[1]}; "
                f"{again}"
            )


def _check_schema(manifest: dict, where: str) -> None:
    """Every key of the manifest is there, known, of its type and in its range, and the
    corpus description agrees with the keys it repeats; else one ConfigError naming the
    first that is not."""
    _check_object(manifest, _MANIFEST_KEYS, where)
    _check_object(manifest["config"], _CONFIG_KEYS, where, "config")
    try:
        TrainConfig(**manifest["config"])
    except ConfigError as e:
        raise ConfigError(f"{where}: config: {e}; run muonjax tokenize again") from None
    splits = manifest["splits"]
    _check_object(splits, dict.fromkeys(SPLITS), where, "splits")
    for split in SPLITS:
        _check_object(splits[split], _SPLIT_KEYS, where, f"splits.{split}")
        for i, name in enumerate(splits[split]["shards"]):
            if not is_plain_name(name):
                raise ConfigError(
                    f"{where}: splits.{split}.shards[{i}] is {name!r}; valid: the name of a file "
                    "in the shards folder (no '/' or '\\', not absolute, '.' or '..', no NUL); "
                    "run muonjax tokenize again"
                )
    if not isinstance(manifest["source"], dict):
        raise ConfigError(f"{where}: source is not a JSON object; run muonjax tokenize again")
    repeated = {
        "tokenizer": manifest["config"]["tokenizer"],
        "vocab_size": manifest["vocab_size"],
        **{f"{split}_tokens": splits[split]["tokens"] for split in SPLITS},
    }
    for key, value in repeated.items():
        if manifest["source"].get(key, value) != value:
            raise ConfigError(
                f"{where}: source.{key} is {manifest['source'][key]!r} but the manifest says "
                f"{value!r}; run muonjax tokenize again"
            )


def inherit_from_shards(config_fields: dict) -> dict:
    """The TrainConfig fields given, with those the shards fix (config.TOKENIZATION_FIELDS)
    taken from the manifest where not given; unchanged unless --data is a shards folder."""
    data = tuple(config_fields.get("data", ()))
    if not is_shards(data):
        return dict(config_fields)
    manifest = read_manifest(data[0])
    return {**{k: manifest["config"][k] for k in TOKENIZATION_FIELDS}, **config_fields}


class ShardedTokens:
    """One split's token stream, read from its shards by slices: len(tokens)
    and tokens[start:stop], as for a NumPy array. Opens the files on first read."""

    def __init__(self, directory: str | os.PathLike, split: str, manifest: dict):
        meta = manifest["splits"][split]
        self.paths = [str(pathlib.Path(directory) / name) for name in meta["shards"]]
        self.length = int(meta["tokens"])
        self.record_tokens = int(manifest["record_tokens"])
        self.dtype = np.dtype(meta["dtype"])
        self._source = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, window: slice) -> np.ndarray:
        start, stop, step = window.indices(self.length)
        if step != 1:
            raise IndexError("ShardedTokens reads contiguous slices only")
        if stop <= start:
            return np.zeros(0, self.dtype)
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        first, last = start // self.record_tokens, (stop - 1) // self.record_tokens
        # one record at a time: ArrayRecord's batched read costs ~30x more per call
        records = [np.frombuffer(self._source[i], self.dtype) for i in range(first, last + 1)]
        tokens = records[0] if len(records) == 1 else np.concatenate(records)
        offset = first * self.record_tokens
        return tokens[start - offset : stop - offset]

    def __repr__(self) -> str:  # stable: grain's iterator checkpoints compare it
        return f"ShardedTokens(tokens={self.length}, shards={len(self.paths)})"


def _stream_dtype(tokens: np.ndarray) -> np.dtype:
    """The smallest of uint8 (bytes), uint16 (vocabularies up to 65536) and
    int32 (larger ones, and SFT's negative prompt tokens) that holds every token."""
    u1, u2, i4 = map(np.dtype, DTYPES)
    if tokens.size == 0 or tokens.min() >= 0:
        top = int(tokens.max()) if tokens.size else 0
        return u1 if top < 2**8 else u2 if top < 2**16 else i4
    return i4


def _write_split(folder: pathlib.Path, split: str, tokens: np.ndarray, shard_tokens: int) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    dtype = _stream_dtype(tokens)
    tokens = tokens.astype(dtype)
    per_shard = max(1, shard_tokens // RECORD_TOKENS) * RECORD_TOKENS
    n_shards = max(1, -(-len(tokens) // per_shard))
    names = [f"{split}-{i:05d}-of-{n_shards:05d}.array_record" for i in range(n_shards)]
    for i, name in enumerate(names):
        writer = ArrayRecordWriter(str(folder / name), "group_size:1,uncompressed")
        part = tokens[i * per_shard : (i + 1) * per_shard]
        for at in range(0, len(part), RECORD_TOKENS):
            writer.write(part[at : at + RECORD_TOKENS].tobytes())
        writer.close()
    digest = hashlib.sha256(tokens.data).hexdigest()  # contiguous: hashed without a copy
    return {"tokens": int(len(tokens)), "dtype": dtype.str, "shards": names, "sha256": digest}


def write_shards(
    config: TrainConfig, out: str | os.PathLike, *, shard_tokens: int = SHARD_TOKENS, log=print
) -> dict:
    """Tokenizes config.data (with config's data_format, tokenizer, BPE size and
    validation fraction, as `muonjax train` would) into shards in `out`, which
    must not exist. Written whole or not at all (files.written_whole); returns
    the manifest."""
    out = pathlib.Path(out)
    if os.path.lexists(out):  # a symbolic link too, dangling or not: rename would fail on it
        raise ConfigError(f"--out {out} exists; muonjax tokenize writes a new folder")
    if shard_tokens < 1:
        raise ConfigError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    try:
        with written_whole(out) as tmp:
            tmp.mkdir()
            manifest = _write_folder(config, tmp, shard_tokens, log)
    except FileExistsError:
        raise ConfigError(
            f"--out {out} was created while tokenize ran; nothing was written"
        ) from None
    except OSError as e:
        raise WriteFailed(f"muonjax tokenize: writing {out} failed ({e}); nothing was kept") from e
    return manifest


def _write_folder(config: TrainConfig, folder: pathlib.Path, shard_tokens: int, log) -> dict:
    """The shards of config.data, their tokenizer and manifest written into `folder`."""
    train, validation, tokenizer, description = tokenize(config, folder)
    tokenizer.save(folder)
    splits = {}
    for split, tokens in zip(SPLITS, (train, validation)):
        written = splits[split] = _write_split(folder, split, tokens, shard_tokens)
        log(f"{split}: {written['tokens']} tokens in {len(written['shards'])} shards")
    manifest = {
        "format": FORMAT,
        "config": {k: getattr(config, k) for k in TOKENIZATION_FIELDS},
        "vocab_size": tokenizer.vocab_size,
        "record_tokens": RECORD_TOKENS,
        "splits": splits,
        "source": description,  # the corpus: files, characters, fingerprint
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_manifest(config: TrainConfig, manifest: dict, directory: str) -> None:
    """The run's TOKENIZATION_FIELDS must be the ones the shards were made with."""
    made = manifest["config"]
    wrong = [k for k in TOKENIZATION_FIELDS if made[k] != getattr(config, k)]
    if wrong:
        given = ", ".join(f"{flag_name(k)} {getattr(config, k)}" for k in wrong)
        theirs = " ".join(f"{flag_name(k)} {made[k]}" for k in wrong)
        raise ConfigError(
            f"--data {directory} was tokenized with {theirs}, but this run has {given}: "
            "leave those flags out (the shards fix them) or tokenize again"
        )
