"""A run's data: the corpus (text or SFT examples) tokenized into training and
validation token streams, or those streams read from `muonjax tokenize`
shards; checked to hold at least a batch each."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from muonjax.train.config import TrainConfig
from muonjax.train.corpus import tokenize
from muonjax.train.errors import ConfigError
from muonjax.train.integrity import Verification, verify
from muonjax.train.shards import (
    MANIFEST,
    SPLITS,
    ShardedTokens,
    check_manifest,
    check_regular,
    is_shards,
    read_manifest,
)
from muonjax.train.tokenizer import BPE_FILE, BPETokenizer, ByteTokenizer


@dataclasses.dataclass
class RunData:
    train_tokens: np.ndarray | ShardedTokens
    validation_tokens: np.ndarray | ShardedTokens
    tokenizer: ByteTokenizer | BPETokenizer
    description: dict
    verification: Verification | None = None  # shards' integrity check; text needs none

    def check(self, *, wait: bool = False) -> None:
        """ConfigError once the shards' verification has failed (`wait`: until it is done)."""
        if self.verification is None:
            return
        if wait:
            self.verification.wait()
        else:
            self.verification.check()


def _from_shards(config: TrainConfig, source: pathlib.Path | None):
    """tokenize()'s result read from the shards folder config.data[0], and its
    Verification (integrity.verify: every record read once, its sha256 and token
    ids checked against the manifest and the tokenizer's vocabulary, before
    training or, for a large folder, while it trains): the streams as
    ShardedTokens, the description the text path's (its fingerprint the
    corpus's) plus where the shards are."""
    directory = config.data[0]
    manifest = read_manifest(directory)
    check_manifest(config, manifest, directory)
    if config.tokenizer == "checkpoint":
        raise ConfigError(
            f"--data {directory}: shards hold byte or BPE tokens; a run with a checkpoint's "
            "tokenizer reads text (--data FILES)"
        )
    tokenizer = _shards_tokenizer(config, directory, source)
    if tokenizer.vocab_size != manifest["vocab_size"]:
        raise ConfigError(
            f"--data {directory}: the tokenizer has {tokenizer.vocab_size} ids but {MANIFEST} "
            f"says the shards were tokenized with {manifest['vocab_size']}; tokenize again"
        )
    vocab = manifest["vocab_size"]
    sft = config.data_format == "sft-jsonl"  # prompt tokens stored as -(id + 1): encode_examples
    verification = verify(directory, manifest, range(-vocab if sft else 0, vocab))
    train, validation = (ShardedTokens(directory, split, manifest) for split in SPLITS)
    description = {
        **manifest["source"],
        "shards": str(pathlib.Path(directory).absolute()),
        "shards_sha256": {split: manifest["splits"][split]["sha256"] for split in SPLITS},
    }
    return train, validation, tokenizer, description, verification


def _shards_tokenizer(config: TrainConfig, directory: str, source: pathlib.Path | None):
    """The tokenizer of a shards folder: bytes, or the BPE of its tokenizer.json (which
    must be the --init-from run's, if any)."""
    if config.tokenizer == "byte":
        return ByteTokenizer()
    path = pathlib.Path(directory) / BPE_FILE
    check_regular(path)
    if source is not None and (source / BPE_FILE).read_bytes() != path.read_bytes():
        raise ConfigError(
            f"--data {directory} was tokenized with another BPE than the --init-from run's; "
            "tokenize it with that run's tokenizer"
        )
    try:
        return BPETokenizer.load(path)
    except ValueError as e:
        raise ConfigError(f"--data {e}") from None


def load_data(
    config: TrainConfig, out: pathlib.Path, source: pathlib.Path | None = None
) -> RunData:
    """Token streams of the training and validation data, from text (tokenized
    now) or from `muonjax tokenize` shards; `source`: the run an --init-from
    run fine-tunes, whose BPE tokenizer it uses."""
    if is_shards(config.data):
        train, validation, tokenizer, description, verification = _from_shards(config, source)
    elif any(is_shards((path,)) for path in config.data):
        raise ConfigError(
            f"--data {' '.join(config.data)}: a folder of muonjax tokenize shards is a run's "
            "whole data; pass it alone"
        )
    else:
        train, validation, tokenizer, description = tokenize(config, out, source)
        verification = None
    window = config.seq_len + 1
    if len(train) < config.batch_size * window:
        raise ConfigError(
            f"--data has {len(train)} training tokens, fewer than one batch of "
            f"--batch-size {config.batch_size} x (--seq-len {config.seq_len} + 1)"
        )
    if len(validation) < config.batch_size * window:
        raise ConfigError(
            f"--data leaves {len(validation)} validation tokens, fewer than one batch of "
            f"{config.batch_size} x {window}; pass more text or a larger --validation-fraction"
        )
    return RunData(train, validation, tokenizer, description, verification)
