"""grain pipelines: token stream -> packed windows -> seeded shuffle -> batches,
each JAX process reading its own disjoint shard."""

from __future__ import annotations

import grain
import numpy as np


class TokenWindows:
    """Random access to the non-overlapping windows of seq_len + 1 tokens."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.window = tokens, seq_len + 1

    def __len__(self) -> int:
        return len(self.tokens) // self.window

    def __getitem__(self, index) -> np.ndarray:
        start = int(index) * self.window
        return self.tokens[start : start + self.window].astype(np.int32)

    def __repr__(self) -> str:
        return f"TokenWindows(tokens={len(self.tokens)}, window={self.window})"


def train_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, shard_index: int, shard_count: int
) -> grain.DatasetIterator:
    """An endless iterator of (batch_size, seq_len + 1) int32 batches for one shard.

    Shuffled from `seed`, reshuffled every epoch; its get_state()/set_state()
    resume exactly where it stopped. The shard holds every shard_count-th window.
    """
    windows = grain.MapDataset.source(TokenWindows(tokens, seq_len))
    usable = len(windows) // shard_count * shard_count  # equal shards
    dataset = windows[:usable][shard_index::shard_count]
    dataset = dataset.shuffle(seed=seed).repeat(None).batch(batch_size, drop_remainder=True)
    return iter(dataset.to_iter_dataset())


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    shard_index: int,
    shard_count: int,
) -> list[np.ndarray]:
    """A fixed list of this shard's validation batches: the first windows, in order."""
    windows = TokenWindows(tokens, seq_len)
    usable = min(len(windows), n_batches * batch_size * shard_count)
    ids = np.arange(shard_index, usable, shard_count)[
        : usable // shard_count // batch_size * batch_size
    ]
    return [np.stack([windows[i] for i in chunk]) for chunk in ids.reshape(-1, batch_size)]
