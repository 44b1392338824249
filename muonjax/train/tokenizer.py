"""Tokenizers that need nothing downloaded: raw UTF-8 bytes, or a byte-level BPE
trained on the run's own training text and saved with the run; and the token
stream of prompt/response examples for fine-tuning."""

from __future__ import annotations

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
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

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
    """The run's tokenizer: bytes, or the BPE saved in `out` by an earlier start
    of the run, else the one of the run it fine-tunes (`source`), else a BPE
    trained on `train_texts` (save it with `.save`)."""
    if kind == "byte":
        return ByteTokenizer()
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
