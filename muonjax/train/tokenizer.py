"""Tokenizers that need nothing downloaded: raw UTF-8 bytes, or a byte-level BPE
trained on the run's own training text and saved with the run."""

from __future__ import annotations

import pathlib

import numpy as np

BPE_FILE = "tokenizer.json"


class ByteTokenizer:
    vocab_size = 256

    def save(self, path: pathlib.Path) -> None:
        """Nothing to save: bytes are bytes."""

    def encode(self, texts) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, np.uint8)).decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

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
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: pathlib.Path) -> None:
        self._tokenizer.save(str(path / BPE_FILE))

    def encode(self, texts) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.uint32) for e in self._tokenizer.encode_batch(list(texts))]

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


def tokenizer_for_run(kind: str, out: pathlib.Path, train_texts, bpe_vocab_size: int):
    """The run's tokenizer: bytes, or the BPE saved in `out` by an earlier start
    of the run, else a BPE trained on `train_texts` (save it with `.save`)."""
    if kind == "byte":
        return ByteTokenizer()
    path = out / BPE_FILE
    if path.exists():
        return BPETokenizer.load(path)
    return BPETokenizer.train(train_texts, bpe_vocab_size)
