"""metrics.jsonl (one JSON object per logged step) and TensorBoard event files.

A metric is a number, or a 1-D array (e.g. one value per layer): a JSON list, and
in TensorBoard one scalar per element, tagged NAME/INDEX."""

from __future__ import annotations

import json
import pathlib

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Appends to <out>/metrics.jsonl and <out>/tensorboard. On resume from
    `step`, lines logged after it (by a run killed before its next checkpoint)
    are dropped from both, so every step appears once."""

    def __init__(self, out: pathlib.Path, resume_step: int | None = None):
        from tensorboardX import SummaryWriter

        self.path = out / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        purge = None if resume_step is None else resume_step + 1
        self._tensorboard = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=purge)
        self._file = self.path.open("a")

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in record.items():
            if name == "step":
                continue
            if isinstance(value, (int, float)):
                self._tensorboard.add_scalar(name, value, step)
            elif isinstance(value, list):
                for i, element in enumerate(value):
                    self._tensorboard.add_scalar(f"{name}/{i}", element, step)

    def close(self) -> None:
        self._file.close()
        self._tensorboard.close()


def _plain(value):
    """A JSON-ready number, or a list of them for an array."""
    if getattr(value, "ndim", 0):
        return value.tolist()
    value = value.item() if hasattr(value, "item") else value
    return float(value) if isinstance(value, float) else value


def read_metrics(out: pathlib.Path) -> list[dict]:
    path = pathlib.Path(out) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
