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


class ExampleRows:
    """Random access to the examples of a packed SFT stream (tokenizer.encode_examples),
    one per row of seq_len + 1 tokens: an example ends where a target token is
    followed by a prompt token (an example with an empty prompt is read with the
    one before it). Rows are filled with -1 (input id 0, not a target). An example
    longer than a row keeps its whole prompt where the response's start still
    fits after it, else the prompt's last half-row; then the response's start."""

    def __init__(self, tokens, seq_len: int):
        self.tokens, self.window = np.asarray(tokens[: len(tokens)], np.int32), seq_len + 1
        ends = np.flatnonzero((self.tokens[:-1] >= 0) & (self.tokens[1:] < 0)) + 1
        self.bounds = np.concatenate([[0], ends, [len(self.tokens)]]) if len(self.tokens) else [0]

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, index) -> np.ndarray:
        example = self.tokens[self.bounds[index] : self.bounds[index + 1]]
        prompt_len = int(np.argmax(example >= 0)) if np.any(example >= 0) else len(example)
        prompt, response = example[:prompt_len], example[prompt_len:]
        keep = min(len(prompt), max(self.window - len(response), self.window // 2))
        row = np.concatenate([prompt[len(prompt) - keep :], response])[: self.window]
        return np.pad(row, (0, self.window - len(row)), constant_values=-1)

    def __repr__(self) -> str:
        return f"ExampleRows(examples={len(self)}, window={self.window})"


def eval_rows(tokens, seq_len: int, examples: bool) -> TokenWindows | ExampleRows:
    """The rows evaluations draw from: SFT examples one per row, or the windows of text."""
    return ExampleRows(tokens, seq_len) if examples else TokenWindows(tokens, seq_len)


def eval_batches(
    rows: TokenWindows | ExampleRows,
    batch_size: int,
    n_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    spread: bool = True,
) -> list[np.ndarray]:
    """This process's rows of a fixed list of evaluation batches: n_batches *
    batch_size of `rows` evenly spread over all of them (all of them when there are
    fewer; the last batch filled with rows of -1, which hold no target), or with
    spread=False the first whole batches, as evaluations were before --holdout."""
    if spread:
        n = min(n_batches * batch_size, len(rows))
        picks = np.arange(n) * len(rows) // max(n, 1)
    else:
        n = min(n_batches, len(rows) // batch_size) * batch_size
        picks = np.arange(n)
    empty = np.full(rows.window, -1, np.int32)
    per_process = batch_size // process_count
    batches = []
    for start in range(0, n, batch_size):
        mine = range(start + process_index * per_process, start + (process_index + 1) * per_process)
        batches.append(np.stack([rows[picks[k]] if k < n else empty for k in mine]))
    return batches
