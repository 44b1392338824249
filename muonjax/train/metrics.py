"""metrics.jsonl (one JSON object per logged step) and TensorBoard event files.

A metric is a number, or a 1-D array (e.g. one value per layer): a JSON list, and
in TensorBoard one scalar per element, tagged NAME/INDEX."""

from __future__ import annotations

import json
import pathlib
import time

from muonjax.train.rundir import METRICS_FILE, TENSORBOARD_DIR


class MetricsWriter:
    """Appends to <out>/metrics.jsonl and <out>/tensorboard. On resume from
    `step`, lines logged after it (by a run killed before its next checkpoint)
    are dropped from both, so every step appears once, and so is a line cut
    short by a kill or a full disk. `set_aside`: a file name in `out` that
    keeps the dropped lines (a run resumed from an earlier checkpoint keeps the
    history it abandons).

    Every write is synchronous and flushed, TensorBoard's too (tensorboardX's
    event records, without its writer thread and queue): a write that fails
    raises OSError in the caller, and a signal or a kill can never leave a
    writer thread to wait for."""

    def __init__(
        self, out: pathlib.Path, resume_step: int | None = None, set_aside: str | None = None
    ):
        from tensorboardX.event_file_writer import EventsWriter

        self.path = out / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept, dropped = [], []
            for line in self.path.read_text().splitlines():
                record = _parse(line)
                if record is not None:
                    (kept if record["step"] <= resume_step else dropped).append(line + "\n")
            if set_aside and dropped:
                (out / set_aside).write_text("".join(dropped))
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(self.path)
        (out / TENSORBOARD_DIR).mkdir(exist_ok=True)
        # one file per start, named from its start time in seconds (tensorboardX's
        # naming) and, so that two starts within a second do not share it, nanoseconds
        suffix = f".{time.time_ns() % 10**9:09d}"
        self._events = EventsWriter(str(out / TENSORBOARD_DIR / "events"), suffix)
        if resume_step is not None:  # TensorBoard hides what earlier files logged after it
            self._event(step=resume_step + 1, session_log=_session_start())
        self._file = self.path.open("a")

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in record.items():
            if name == "step":
                continue
            values = value if isinstance(value, list) else [value]
            for i, element in enumerate(values):
                if isinstance(element, (int, float)):
                    tag = f"{name}/{i}" if isinstance(value, list) else name
                    self._event(step=step, summary=_scalar(tag, element))
        self._events.flush()

    def _event(self, **fields) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self._events.write_event(Event(wall_time=time.time(), **fields))

    def close(self) -> None:
        self._file.close()
        self._events.close()


def _scalar(tag: str, value: float):
    from tensorboardX.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=tag, simple_value=value)])


def _session_start():
    from tensorboardX.proto.event_pb2 import SessionLog

    return SessionLog(status=SessionLog.START)


def _plain(value):
    """A JSON-ready number, or a list of them for an array."""
    if getattr(value, "ndim", 0):
        return value.tolist()
    value = value.item() if hasattr(value, "item") else value
    return float(value) if isinstance(value, float) else value


def _parse(line: str) -> dict | None:
    """A metrics line's record; None for a blank line or one cut short."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def read_metrics(out: pathlib.Path) -> list[dict]:
    """The records of <out>/metrics.jsonl, in order (a line cut short is left out)."""
    path = pathlib.Path(out) / METRICS_FILE
    records = (_parse(line) for line in path.read_text().splitlines())
    return [r for r in records if r is not None]
