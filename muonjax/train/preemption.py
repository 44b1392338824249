"""Signals: SIGTERM (what cluster schedulers send) and SIGINT (Ctrl-C).

While a run trains, the first stops it after its current step, with a
checkpoint; a second aborts at once. Inside an `at_once` block (work that
leaves nothing half-written: a run's set-up and first compilation, tokenize,
convert, generate) a signal ends the process at once: the blocks' clean-ups
run, one line is printed, and the process exits with the outermost block's
code. That holds while the main thread is blocked in C (an XLA compilation,
BPE training, the open() of a FIFO), where a Python handler would wait for it
to return: Python's C-level handler writes each signal's number to a wakeup
fd (`signal.set_wakeup_fd`), and a watcher thread acts on it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax
import numpy as np

from muonjax.files import remove_partials


class _Block:
    """One `at_once` block: its message (a str whose "{signal}" is filled in, or a
    function of the signal's name), exit code
    (None: 128 + the signal's number, as a shell reports a killed process) and
    clean-up."""

    def __init__(self, owner: StopOnSignal, message: str, code: int | None, cleanup):
        self.owner, self.message, self.code, self.cleanup = owner, message, code, cleanup

    @property
    def open(self) -> bool:
        return self in self.owner._blocks

    def close(self) -> None:
        if self.open:
            self.owner._blocks.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StopOnSignal:
    """SIGTERM / SIGINT handled for the `with` block: recorded (`received`,
    `stop_requested`), or inside `at_once` blocks acted on at once. Nested uses
    share the outermost one, so that a command's clean-up also covers the runs
    it starts (convert's run of 0 steps)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    _active: StopOnSignal | None = None

    def __init__(self, command: str = "muonjax train"):
        self.command = command
        self.received: int | None = None
        self._previous = {}
        self._blocks: list[_Block] = []
        self._shared = None  # the outer StopOnSignal this one stands for
        self._pipe = None
        self._thread = None

    def _handle(self, signum, frame):
        if self.received is not None:
            os.write(
                2, f"{self.command}: second {signal.Signals(signum).name}: aborting\n".encode()
            )
            os._exit(128 + signum)
        self.received = signum

    def __enter__(self):
        if StopOnSignal._active is not None:
            self._shared = StopOnSignal._active
            return self._shared
        if threading.current_thread() is threading.main_thread():
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
            self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            self._pipe = (read, write)
            self._thread = threading.Thread(target=self._watch, name="muonjax-signals", daemon=True)
            self._thread.start()
        StopOnSignal._active = self
        return self

    def __exit__(self, *exc):
        if self._shared is not None:
            self._shared = None
            return
        StopOnSignal._active = None
        self._blocks.clear()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_fd)
            os.close(self._pipe[1])  # the watcher reads end-of-file and returns
            self._thread.join(timeout=5)
            os.close(self._pipe[0])
            self._pipe = None

    def at_once(self, message: str, *, code: int | None = None, cleanup=None) -> _Block:
        """From now until the returned block is closed (or its `with` ends), a
        signal runs every open block's `cleanup` (innermost first), prints
        `message` of the outermost block and exits with its `code`."""
        block = _Block(self, message, code, cleanup)
        self._blocks.append(block)
        return block

    def _watch(self) -> None:
        read = self._pipe[0]
        while True:
            try:
                data = os.read(read, 64)
            except OSError:
                return
            if not data:
                return
            if self._blocks and any(s in data for s in self.SIGNALS):
                self._end(next(s for s in data if s in self.SIGNALS))

    def _end(self, signum: int) -> None:
        blocks = list(self._blocks)
        for block in reversed(blocks):
            if block.cleanup is not None:
                try:
                    block.cleanup()
                except Exception:  # noqa: BLE001 -- exiting anyway: the next run cleans up
                    pass
        outer = blocks[0]
        name = signal.Signals(signum).name
        message = outer.message
        line = message.format(signal=name) if isinstance(message, str) else message(name)
        os.write(2, (line + "\n").encode())
        os._exit(128 + signum if outer.code is None else outer.code)

    def stop_requested(self) -> bool:
        """Whether any process got a signal (all processes agree, so all stop together)."""
        mine = self.received is not None
        if jax.process_count() == 1:
            return mine
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(mine))))


@contextlib.contextmanager
def ends_at_once(command: str, out=None):
    """For a command with nothing to save (tokenize, convert, generate): SIGTERM /
    SIGINT end it at once, with one line and exit 128 + the signal, after removing
    this process's partial folders of `out` (files.written_whole), if it writes one."""
    cleanup = None if out is None else (lambda: remove_partials(out, mine=True))
    written = "" if out is None else "; nothing was written"
    with StopOnSignal(command) as signals:
        with signals.at_once(f"{command}: {{signal}} received: stopped{written}", cleanup=cleanup):
            yield signals
