"""Shards checked against their manifest before they are trusted: every record
read once, its layout, the split's sha256 and every token id checked.

A folder of up to VERIFY_AT_START_BYTES token bytes is verified before training
starts; a larger one in a background thread while the run trains (reading
costs about 2.6 s per GB on a 2-core CPU, experiments/bench_data.py, which
would make start-up grow with the data): the run stops at the step after a
check fails, and waits for the check before it reports success.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import threading

import numpy as np

from muonjax.train.errors import ConfigError
from muonjax.train.shards import SPLITS, check_regular

VERIFY_RECORDS = 256  # records read per call while verifying: at most 4 MiB
VERIFY_AT_START_BYTES = 2**30  # ~3 s here; beyond, in the background


class Verification:
    """verify_shards of a folder, done now or (`background`) in a daemon thread:
    `check()` raises its ConfigError once it has failed, `wait()` until it is done."""

    def __init__(self, directory, manifest: dict, ids: range, *, background: bool):
        self.error: ConfigError | None = None
        self._thread = None
        check_files(directory, manifest)  # cheap, and a FIFO must not block the thread
        if not background:
            _verify_splits(directory, manifest, ids)
            return
        self._thread = threading.Thread(
            target=self._verify, args=(directory, manifest, ids), name="muonjax-verify", daemon=True
        )
        self._thread.start()

    def _verify(self, directory, manifest: dict, ids: range) -> None:
        try:
            _verify_splits(directory, manifest, ids)
        except ConfigError as e:
            self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self.check()


def token_bytes(manifest: dict) -> int:
    """The bytes of the token streams the manifest describes."""
    return sum(
        manifest["splits"][s]["tokens"] * np.dtype(manifest["splits"][s]["dtype"]).itemsize
        for s in SPLITS
    )


def verify(directory, manifest: dict, ids: range) -> Verification:
    """The folder's Verification: before returning for up to VERIFY_AT_START_BYTES
    of tokens, in the background beyond."""
    return Verification(
        directory, manifest, ids, background=token_bytes(manifest) > VERIFY_AT_START_BYTES
    )


def verify_shards(directory: str | os.PathLike, manifest: dict, ids: range) -> None:
    """Every split's shards hold what the (schema-checked) manifest says, read once in
    full: regular files (all checked before any is opened) that ArrayRecord reads,
    holding ceil(tokens / record_tokens) records of record_tokens tokens of the
    split's dtype (the split's last one the rest), whose token stream has the
    manifest's sha256 (as tokenize hashes it) and every token id in `ids`;
    else one ConfigError naming the file."""
    check_files(directory, manifest)
    _verify_splits(directory, manifest, ids)


def check_files(directory, manifest: dict) -> None:
    """Every shard the manifest names is a regular file (checked before any is opened)."""
    for split in SPLITS:
        for name in manifest["splits"][split]["shards"]:
            check_regular(pathlib.Path(directory) / name)


def _verify_splits(directory, manifest: dict, ids: range) -> None:
    for split in SPLITS:
        _verify_split(pathlib.Path(directory), split, manifest, ids, f"--data {directory}")


def _verify_split(folder: pathlib.Path, split: str, manifest: dict, ids: range, where: str):
    """verify_shards for one split: its records in order across its files."""
    meta, per_record = manifest["splits"][split], manifest["record_tokens"]
    dtype, records = np.dtype(meta["dtype"]), -(-meta["tokens"] // per_record)
    full, last = per_record, meta["tokens"] - (records - 1) * per_record
    layout = f"the manifest's {split} tokens, record_tokens and dtype"
    digest, seen = hashlib.sha256(), 0
    for name in meta["shards"]:
        for block in _read_records(folder / name, where):
            if seen + len(block) > records:
                raise ConfigError(
                    f"{where}: the {split} shards hold more than the {records} records "
                    f"{layout} make; tokenize again"
                )
            for k, record in enumerate(block, seen):
                size = (full if k < records - 1 else last) * dtype.itemsize
                if len(record) != size:
                    raise ConfigError(
                        f"{where}: {name} holds {len(record)} bytes in {split} record {k}, "
                        f"where {layout} make {size}; tokenize again"
                    )
            seen += len(block)
            data = b"".join(block)
            digest.update(data)
            _check_ids(np.frombuffer(data, dtype), ids, f"{where}: {name}")
    if seen != records:
        raise ConfigError(
            f"{where}: the {split} shards hold {seen} records, where {layout} make {records}; "
            "tokenize again"
        )
    if digest.hexdigest() != meta["sha256"]:
        raise ConfigError(
            f"{where}: the {split} shards' tokens have sha256 {digest.hexdigest()}, not the "
            f"manifest's {meta['sha256']}: a shard was changed or replaced; tokenize again"
        )


def _check_ids(tokens: np.ndarray, ids: range, where: str) -> None:
    """Every token of `tokens` is in `ids` (else the model would read past its vocabulary)."""
    if tokens.size == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < ids.start or high >= ids.stop:
        bad = low if low < ids.start else high
        raise ConfigError(
            f"{where} holds token {bad}, outside the vocabulary's ids [{ids.start}, {ids.stop}); "
            "tokenize again"
        )


def _read_records(path: pathlib.Path, where: str):
    """The records of one ArrayRecord file, VERIFY_RECORDS at a time. A file it cannot
    read (truncated, garbage, empty, bytes changed) makes ArrayRecord raise
    RuntimeError, not abort the process: here a ConfigError naming the file."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(str(path))
        try:
            if not reader.ok():
                raise RuntimeError  # close() raises with the reason, where it has one
            count = reader.num_records()
            for start in range(0, count, VERIFY_RECORDS):
                yield reader.read(start, min(start + VERIFY_RECORDS, count))
        finally:
            reader.close()
    except RuntimeError as e:
        why = " ".join(str(e).split()) or "not an ArrayRecord file"
        raise ConfigError(
            f"{where}: {path.name} is damaged: ArrayRecord cannot read it ({why})"
        ) from None
