"""A run's data: the corpus (text or SFT examples) tokenized into training and
validation token streams, checked to hold at least a batch each."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from muonjax.train.config import ConfigError, TrainConfig
from muonjax.train.corpus import load_corpus, load_examples, split_examples, split_texts
from muonjax.train.tokenizer import BPETokenizer, ByteTokenizer, encode_examples, tokenizer_for_run


@dataclasses.dataclass
class RunData:
    train_tokens: np.ndarray
    validation_tokens: np.ndarray
    tokenizer: ByteTokenizer | BPETokenizer
    description: dict


def load_data(
    config: TrainConfig, out: pathlib.Path, source: pathlib.Path | None = None
) -> RunData:
    """Token streams of the training and validation data; `source`: the run an
    --init-from run fine-tunes, whose BPE tokenizer it uses."""
    if config.data_format == "sft-jsonl":  # prompt tokens stored as -(id + 1): not targets
        corpus = load_examples(config.data)
        train_pairs, validation_pairs = split_examples(corpus.pairs, config.validation_fraction)
        bpe_texts = [text for pair in train_pairs for text in pair]
        tokenizer = tokenizer_for_run(
            config.tokenizer, out, bpe_texts, config.bpe_vocab_size, source
        )
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
        tokenizer = tokenizer_for_run(
            config.tokenizer, out, train_texts, config.bpe_vocab_size, source
        )
        train, validation = (
            np.concatenate([np.zeros(0, np.uint8), *tokenizer.encode(t)])
            for t in (train_texts, validation_texts)
        )
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
    description = {
        **corpus.describe(),
        "tokenizer": config.tokenizer,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": int(len(train)),
        "validation_tokens": int(len(validation)),
        **sft,
    }
    return RunData(train, validation, tokenizer, description)
