"""The run directory (--out): the names of what a run writes there, and its
config.json read (bounded, checked) and written (atomically).

    config.json      {"train": TrainConfig, "model": ModelConfig, "data": ..., "history": ...}
    checkpoints/     orbax, one folder per step (checkpoint.py reads and writes them)
    metrics.jsonl    one JSON object per logged step (metrics.py)
    tensorboard/     TensorBoard event files (metrics.py)
    .lock, .lock.N   one writer per run (lock.py)
    tokenizer.json   the run's BPE, or a checkpoint's tokenizer files (tokenizer.py)
"""

from __future__ import annotations

import json
import os
import pathlib

from muonjax.files import NotRegularFile, regular_file_size
from muonjax.train.errors import ConfigError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".lock"
MAX_CONFIG_BYTES = 2**26  # a run's config.json is a few KiB; read whole, so bounded


def read_run_config(out: pathlib.Path, flag: str = "--resume") -> dict:
    """The config.json of the run in `out` (its "train", "model", "data", ...
    objects), or a ConfigError that names `flag` and the file."""
    path = pathlib.Path(out) / CONFIG_FILE
    if not os.path.lexists(path):
        raise ConfigError(
            f"{flag} {out}: no {CONFIG_FILE} there; it is not a muonjax train run's --out"
        )
    try:
        size = regular_file_size(path)  # a FIFO would block the read forever
    except NotRegularFile as e:
        raise ConfigError(f"{flag}: {e}") from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{flag}: {path} has {size:,} bytes, more than a run's config.json")
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{flag}: cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" ({e.msg} at line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ConfigError(f"{flag}: {path} is not valid JSON{where}") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), dict) for k in ("train", "model")
    ):
        raise ConfigError(f"{flag}: {path} is not a muonjax run's config (no train and model)")
    return data


def save_json(path: pathlib.Path, data: dict) -> None:
    """`data` written to `path` whole: into a temporary file, then renamed."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
