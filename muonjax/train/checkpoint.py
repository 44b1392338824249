"""orbax checkpoints of a run: the train state, and metadata (config, step and
the data iterator's state, which is the same on every process).

Saves are asynchronous (the step loop continues while files are written) and
atomic: a save killed half-way leaves a tmp folder that latest_step() ignores,
so a resumed run starts from the last complete checkpoint.

A resume (restore_latest) tries the checkpoints newest first. One that does not
restore (a truncated or garbage array file, a missing `_METADATA`, `state/` or
`meta/`, an empty step folder: any error while reading it) is skipped with one
warning line, and the run resumes from the newest one that restores. A skipped
checkpoint is never deleted: it is renamed to `STEP.damaged-TIMESTAMP` next to
the others, so that the resumed run can save that step number again, and so that
orbax's retention (max_to_keep) never removes it. If none restores, nothing is
renamed and ConfigError says so.

A save that fails (disk full, an I/O error) raises WriteFailed, at the save or
at the first `check()` after the background write failed: one line naming the
checkpoint and the last complete one, which the failed save does not touch.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import re
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from muonjax.train.config import ConfigError, WriteFailed


class Checkpointer:
    def __init__(self, directory: pathlib.Path, keep: int):
        self._directory = directory.absolute()
        self._saving: int | None = None  # the step of the save in progress
        # create=False: the first save makes the folder, so that a run killed while it
        # sets up leaves no `checkpoints/` in an --out it has not yet written config.json to.
        # _quiet_orbax: a damaged step folder, restore_latest says it in one line.
        _quiet_failed_writes.install()
        with _quiet_orbax():
            self._manager = ocp.CheckpointManager(
                directory.absolute(),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep, enable_async_checkpointing=True, create=False
                ),
            )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The complete checkpoints' steps, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Starts writing; returns once the arrays are copied off the devices.
        WriteFailed if the save before it failed, if the file system has not
        room for this one (checked first: no write is started), or if starting
        it fails."""
        self.wait()  # orbax waits for the previous save anyway: its failure is its own
        need = int(1.1 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))) + 2**20
        existing = next(p for p in (self._directory, *self._directory.parents) if p.exists())
        free = shutil.disk_usage(existing).free
        if not _everywhere(free >= need):  # every process saves, or none does
            here = " here (a process has too little)" if jax.process_count() > 1 else ""
            raise WriteFailed(
                f"no room for checkpoint {step} in {self._directory}: it needs about "
                f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free{here}; "
                f"{self.last_complete()}"
            )
        self._saving = step
        with self._reporting_failure():
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
            )

    def check(self) -> None:
        """WriteFailed if the save in progress has ended and failed; cheap, for every
        step. (orbax's check_for_errors misses it: its finalize thread takes the error.)"""
        if self._saving is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until the save in progress is complete; WriteFailed if it failed."""
        with self._reporting_failure():
            self._manager.wait_until_finished()
        self._saving = None

    @contextlib.contextmanager
    def _reporting_failure(self):
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- orbax, tensorstore or the OS: any of them
            failed, self._saving = self._saving, None
            raise WriteFailed(
                f"saving checkpoint {failed} in {self._directory} failed ({_reason(e)}); "
                f"{self.last_complete(failed)}"
            ) from e

    def last_complete(self, failed: int | None = None) -> str:
        """Which checkpoint is the last complete one (leaving out `failed`), in words."""
        complete = [s for s in self._manager.all_steps() if s != failed]
        if not complete:
            return "no checkpoint is complete"
        return f"the last complete checkpoint is {max(complete)}"

    def restore(self, step: int, abstract_state):
        """The state laid out as `abstract_state` says (shapes, dtypes, shardings:
        it may be another mesh, or another number of processes, than the one
        saved from), and the metadata."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.meta

    def restore_latest(self, abstract_state, log=print):
        """(step, state, meta) of the newest checkpoint that restores, None if the
        directory holds no checkpoint at all. Newer ones that do not restore are
        skipped with one warning line each through `log`, and set aside (renamed
        `STEP.damaged-TIMESTAMP`, never deleted); ConfigError if none restores."""
        steps = sorted(set(self._manager.all_steps()) | set(self._step_folders()), reverse=True)
        if not steps:
            return None
        skipped = []
        for step in steps:
            try:
                with _quiet_orbax():
                    state, meta = self._restore_checked(step, abstract_state)
            except Exception as e:  # noqa: BLE001 -- any failure to read it: orbax, tensorstore, files
                skipped.append((step, _short(e)))
                continue
            with _quiet_orbax():
                names = self._set_aside([s for s, _ in skipped], "damaged")
            for (bad, reason), name in zip(skipped, names, strict=True):
                log(
                    f"warning: checkpoint {bad} in {self._directory} does not restore "
                    f"({reason}); kept as {name}, resuming from {step}"
                )
            return step, state, meta
        newest, reason = skipped[0]
        raise ConfigError(
            f"--resume: no checkpoint in {self._directory} restores (tried steps "
            f"{', '.join(str(s) for s, _ in skipped)}; step {newest}: {reason})"
        )

    def _step_folders(self) -> list[int]:
        """Steps that have a folder, complete or not (an empty `70/` is one too):
        a resumed run must not meet them again when it saves that step."""
        if not self._directory.is_dir():
            return []
        return [int(p.name) for p in self._directory.iterdir() if p.is_dir() and p.name.isdigit()]

    def _restore_checked(self, step: int, abstract_state):
        folder = self._directory / str(step)
        for part in ("state", "meta"):
            if not (folder / part).is_dir():
                raise FileNotFoundError(f"{part}/ is missing")
        state, meta = self.restore(step, abstract_state)
        if not isinstance(meta, dict) or "data" not in meta:
            raise ValueError("its metadata has no data iterator state")
        return state, meta

    def restore_step(self, step: int, abstract_state, log=print):
        """(step, state, meta) of checkpoint `step` (ConfigError if there is none or
        it does not restore); the newer ones are set aside, renamed
        `STEP.abandoned-TIMESTAMP`, so that the run goes on from `step`."""
        steps = sorted(set(self._manager.all_steps()) | set(self._step_folders()))
        if step not in steps:
            have = ", ".join(map(str, steps)) or "none"
            raise ConfigError(
                f"--resume-from {step}: no checkpoint {step} in {self._directory} (there: {have})"
            )
        try:
            with _quiet_orbax():
                state, meta = self._restore_checked(step, abstract_state)
        except Exception as e:  # noqa: BLE001 -- as in restore_latest
            raise ConfigError(f"--resume-from {step}: it does not restore ({_short(e)})") from None
        newer = [s for s in steps if s > step]
        with _quiet_orbax():
            names = self._set_aside(newer, "abandoned")
        if names:
            log(f"{self._directory}: later checkpoints set aside as {', '.join(names)}")
        return step, state, meta

    def _set_aside(self, steps: list[int], why: str) -> list[str]:
        """Renames each step's folder `STEP.{why}-TIMESTAMP` (the lead process; the
        others wait for it); returns the new names."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        names = [f"{step}.{why}-{stamp}" for step in steps]
        if jax.process_index() == 0:
            for step, name in zip(steps, names, strict=True):
                (self._directory / str(step)).rename(self._directory / name)
        if steps:
            ocp.multihost.sync_global_processes(f"muonjax_set_aside_{why}_checkpoints")
            self._manager.reload()
        return names

    def close(self) -> None:
        self._manager.close()


class _NoMissingStepMetadata(logging.Filter):
    """Drops orbax's warning that a step folder has no _CHECKPOINT_METADATA (an
    empty or damaged one; it comes from every CheckpointManager that lists the
    folder, finetune.latest_step's too): restore_latest says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Metadata file does not exist: ")


class _NoSaveTracebacks(logging.Filter):
    """Drops orbax's error records that carry a traceback (a failed background
    save logs several, each a few hundred lines): the exception reaches the
    Checkpointer, which reports it as WriteFailed in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
        return not (from_orbax and record.levelno >= logging.ERROR and record.exc_info)


logging.getLogger("absl").addFilter(_NoMissingStepMetadata())
logging.getLogger("absl").addFilter(_NoSaveTracebacks())


@contextlib.contextmanager
def _quiet_orbax():
    """orbax's own warnings (absl) off: they come as several lines per damaged checkpoint."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process (the processes agree, so all stop together)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _reason(error: BaseException) -> str:
    """Why a write failed: the OS's words where the error or its causes quote them
    (tensorstore: "... No space left on device [os_error_code='28']"), else the
    error in short."""
    texts, seen = [], error
    while seen is not None and len(texts) < 8:
        texts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(texts)
    found = re.search(r"([A-Za-z][A-Za-z ]*) \[os_error_code='?\d+'?\]", text)
    if found:
        return found.group(1).strip()
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES):
        if os.strerror(code) in text:
            return os.strerror(code)
    return _short(error)


class _QuietFailedWrites:
    """From the first Checkpointer on, for the rest of the process: a failed
    background write also makes tensorstore's callbacks meet orbax's closed event
    loop ("Event loop is closed", through sys.unraisablehook, dozens of
    tracebacks), and asyncio log the write tasks' exceptions as never retrieved,
    some when they are garbage-collected at exit. The failure itself reaches the
    Checkpointer, which reports it in one line; these echoes of it are dropped,
    anything else passes."""

    def __init__(self):
        self._previous = None

    def install(self) -> None:
        if self._previous is None:
            self._previous = sys.unraisablehook
            sys.unraisablehook = self._unraisable
            logging.getLogger("asyncio").addFilter(self._never_retrieved)

    def _unraisable(self, info) -> None:
        closed = isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(
            info.exc_value
        )
        if not (closed or _is_write_failure(repr(info.object))):
            self._previous(info)

    @staticmethod
    def _never_retrieved(record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not ("exception was never retrieved" in message and _is_write_failure(message))


def _is_write_failure(text: str) -> bool:
    return any(mark in text for mark in ("orbax", "tensorstore", "OCDBT", "os_error_code"))


_quiet_failed_writes = _QuietFailedWrites()


def _short(error: Exception) -> str:
    """The exception's type and the first line of its message, at most ~160 characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs that carry the shardings a restore should produce."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )
