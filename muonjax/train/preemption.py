"""Preemption: SIGTERM (what cluster schedulers send) and SIGINT stop a run
after its current step, with a checkpoint; a second signal aborts at once."""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np


class StopOnSignal:
    """SIGTERM / SIGINT while training: the first asks the loop to stop after the
    current step (it checkpoints and raises Preempted); a second aborts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            os.write(2, f"muonjax train: second {signal.Signals(signum).name}: aborting\n".encode())
            os._exit(128 + signum)
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def stop_requested(self) -> bool:
        """Whether any process got a signal (all processes agree, so all stop together)."""
        mine = self.received is not None
        if jax.process_count() == 1:
            return mine
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(mine))))
