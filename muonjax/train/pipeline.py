"""grain pipelines: token stream -> packed windows -> seeded shuffle -> batches.

Every JAX process reads only its own rows of each global batch, and the
global batches are those of a single process, so the global batches do not depend on the number of processes (a run
on 2 hosts sees what a run on 1 sees) and the iterator state is the same
everywhere."""

from __future__ import annotations

import grain
import numpy as np

# Batches read ahead, by a few threads: enough to hide reads from shards behind a
# step, and host memory of a few batches (grain's default is 500 batches ahead).
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)


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
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """An endless iterator of this process's (batch_size / process_count, seq_len + 1)
    int32 rows of each global batch.

    Shuffled from `seed`, reshuffled every epoch; get_state() / set_state()
    resume exactly where it stopped.
    """
    rows = batch_size // process_count
    lo = process_index * rows
    windows = grain.MapDataset.source(TokenWindows(tokens, seq_len))
    stream = windows.shuffle(seed=seed).repeat(
        None
    )  # global batch b: stream[b*batch_size:][:batch_size]
    # row i of this process is row lo + i % rows of global batch i // rows;
    # the process reads only its own windows
    mine = grain.MapDataset.range(len(stream) // batch_size * rows).map(
        lambda i: stream[i // rows * batch_size + lo + i % rows]
    )
    return iter(mine.batch(rows, drop_remainder=True).to_iter_dataset(READ_OPTIONS))


def batches_per_pass(tokens, seq_len: int, batch_size: int) -> int:
    """Global batches in one pass over `tokens`: train_batches' windows, batch_size
    at a time (a batch that straddles two passes is not counted)."""
    return len(TokenWindows(tokens, seq_len)) // batch_size


def skip(batches: grain.DatasetIterator, n: int) -> None:
    """Moves a train_batches iterator past its next n batches without reading
    them: its state is the index of the batch it gives next."""
    state = batches.get_state()
    batches.set_state({**state, "next_index": state["next_index"] + n})


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[np.ndarray]:
    """This process's rows of a fixed list of validation batches: the first windows, in order."""
    windows = TokenWindows(tokens, seq_len)
    n_batches = min(n_batches, len(windows) // batch_size)
    rows = batch_size // process_count
    lo = process_index * rows
    return [
        np.stack([windows[b * batch_size + lo + i] for i in range(rows)]) for b in range(n_batches)
    ]
