"""Pre-tokenized data: ArrayRecord shards (grain's native format) and a manifest.

`muonjax tokenize` reads and tokenizes a corpus once and writes DIR/:

    manifest.json                       tokenizer, token counts, layout, source fingerprint
    tokenizer.json                      with --tokenizer bpe
    train-00000-of-00003.array_record   the training token stream, in records of
    ...                                 RECORD_TOKENS tokens (the last one shorter)
    validation-00000-of-00001.array_record

`muonjax train --data DIR` then reads each window of seq_len + 1 tokens from
the records that hold it (one or two), so a process reads only the windows of
its own rows of each batch: no process reads the whole dataset, and start-up
does not grow with it. The token streams are exactly the text path's (the same
split, tokenizer and order), so a run trains on the same batches either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import time

import numpy as np

from muonjax.train.config import ConfigError, TrainConfig, WriteFailed, _flag

MANIFEST = "manifest.json"
FORMAT = "muonjax-tokens/1"
RECORD_TOKENS = 4096  # a window of up to 4097 tokens spans at most two records
SHARD_TOKENS = 2**26  # tokens per shard file: 64-256 MiB
SPLITS = ("train", "validation")
# the TrainConfig fields the shards fix; a run that does not give them takes the manifest's
FIXED = ("data_format", "tokenizer", "bpe_vocab_size", "validation_fraction")


def is_shards(data: tuple[str, ...]) -> bool:
    """Whether --data names one folder written by `muonjax tokenize`."""
    return len(data) == 1 and (pathlib.Path(data[0]) / MANIFEST).is_file()


def read_manifest(directory: str | os.PathLike) -> dict:
    path = pathlib.Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--data {directory}: cannot read {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(
            f"--data {directory}: {MANIFEST} is not a muonjax tokenize manifest "
            f"(format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
            f"expected {FORMAT!r}); run muonjax tokenize again"
        )
    return manifest


def inherit_from_shards(config_fields: dict) -> dict:
    """The TrainConfig fields given, with those the shards fix (FIXED) taken from
    the manifest where not given; unchanged unless --data is a shards folder."""
    data = tuple(config_fields.get("data", ()))
    if not is_shards(data):
        return dict(config_fields)
    manifest = read_manifest(data[0])
    return {**{k: manifest["config"][k] for k in FIXED}, **config_fields}


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
    if tokens.size == 0 or tokens.min() >= 0:
        top = int(tokens.max()) if tokens.size else 0
        return np.dtype("u1") if top < 2**8 else np.dtype("<u2") if top < 2**16 else np.dtype("<i4")
    return np.dtype("<i4")


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
    must not exist. Written whole or not at all; returns the manifest."""
    from muonjax.train.data import tokenize

    out = pathlib.Path(out)
    if out.exists():
        raise ConfigError(f"--out {out} exists; muonjax tokenize writes a new folder")
    if shard_tokens < 1:
        raise ConfigError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create it ({e.strerror})") from None
    try:
        train, validation, tokenizer, description = tokenize(config, tmp)
        tokenizer.save(tmp)
        splits = {}
        for split, tokens in zip(SPLITS, (train, validation)):
            splits[split] = _write_split(tmp, split, tokens, shard_tokens)
            log(
                f"{split}: {splits[split]['tokens']} tokens in {len(splits[split]['shards'])} shards"
            )
        manifest = {
            "format": FORMAT,
            "config": {k: getattr(config, k) for k in FIXED},
            "vocab_size": tokenizer.vocab_size,
            "record_tokens": RECORD_TOKENS,
            "splits": splits,
            "source": description,  # the corpus: files, characters, fingerprint
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.rename(out)
    except OSError as e:
        raise WriteFailed(f"muonjax tokenize: writing {out} failed ({e}); nothing was kept") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def check_manifest(config: TrainConfig, manifest: dict, directory: str) -> None:
    """The run's FIXED fields must be the ones the shards were made with."""
    made = manifest["config"]
    wrong = [k for k in FIXED if made[k] != getattr(config, k)]
    if wrong:
        given = ", ".join(f"{_flag(k)} {getattr(config, k)}" for k in wrong)
        theirs = " ".join(f"{_flag(k)} {made[k]}" for k in wrong)
        raise ConfigError(
            f"--data {directory} was tokenized with {theirs}, but this run has {given}: "
            "leave those flags out (the shards fix them) or tokenize again"
        )
