"""orbax checkpoints of a run, the one place that opens them: the train state,
and metadata (config, step and the data iterator's state, which is the same on
every process), in RUN/checkpoints/STEP/{state,meta}. A run's Checkpointer
saves and resumes; read_arrays, latest_step and read_state read a run (which
may be training) without writing to it.

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
renamed and ConfigError says so. Reading a run (generate, convert) follows the
same rule (restore_newest) without renaming anything.

A save that fails (disk full, an I/O error) raises WriteFailed, at the save or
at the first `check()` after the background write failed: one line naming the
checkpoint and the last complete one, which the failed save does not touch.
"""

from __future__ import annotations

import contextlib
import errno
import gc
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

from muonjax.train.errors import ConfigError, WriteFailed
from muonjax.train.rundir import CHECKPOINT_DIR

# The orbax items of a step's folder (ocp.args.Composite's keywords below).
STATE, META = "state", "meta"


def run_checkpoints(run: pathlib.Path) -> pathlib.Path:
    """The checkpoints folder of the run directory `run`."""
    return pathlib.Path(run) / CHECKPOINT_DIR


def _manager(directory: pathlib.Path, **options) -> ocp.CheckpointManager:
    """orbax's manager of the checkpoints in `directory`. create=False: the first save
    makes the folder, so that a run killed while it sets up leaves no `checkpoints/`
    in an --out it has not yet written config.json to, and a read writes nothing."""
    return ocp.CheckpointManager(
        directory.absolute(), options=ocp.CheckpointManagerOptions(create=False, **options)
    )


class Checkpointer:
    def __init__(self, directory: pathlib.Path, keep: int):
        self._directory = directory.absolute()
        self._saving: int | None = None  # the step of the save in progress
        # _quiet_orbax: a damaged step folder, restore_latest says it in one line.
        _quiet_echoes.install()
        with _quiet_orbax():
            self._manager = _manager(directory, max_to_keep=keep, enable_async_checkpointing=True)

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
        found = restore_newest(
            self._directory,
            # folders orbax does not list (an empty `70/`) too: set aside, so that a
            # resumed run does not meet them again when it saves that step
            lambda: set(self._manager.all_steps()) | set(step_folders(self._directory)),
            lambda step: self._restore_checked(step, abstract_state),
            "--resume",
        )
        if found is None:
            return None
        step, (state, meta), damaged = found
        with _quiet_orbax():
            names = self._set_aside([s for s, _ in damaged], "damaged")
        for (bad, reason), name in zip(damaged, names, strict=True):
            log(
                f"warning: checkpoint {bad} in {self._directory} does not restore "
                f"({reason}); kept as {name}, resuming from {step}"
            )
        return step, state, meta

    def _restore_checked(self, step: int, abstract_state):
        folder = self._directory / str(step)
        for part in (STATE, META):
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
        steps = sorted(set(self._manager.all_steps()) | set(step_folders(self._directory)))
        if step not in steps:
            have = ", ".join(map(str, steps)) or "none"
            raise ConfigError(
                f"--resume-from {step}: no checkpoint {step} in {self._directory} (there: {have})"
            )
        restored, failure = attempt_restore(self._restore_checked, step, abstract_state)
        if failure is not None:
            raise ConfigError(f"--resume-from {step}: it does not restore ({failure})")
        state, meta = restored
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
    folder, latest_step's too): restore_latest says it in one line."""

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


class _QuietOrbaxEchoes:
    """From the first Checkpointer or checkpoint read on, for the rest of the
    process: orbax's failures echo after they are reported. A failed background
    write makes tensorstore's callbacks meet orbax's closed event loop ("Event
    loop is closed", through sys.unraisablehook, dozens of tracebacks), and asyncio
    log the write tasks' exceptions as never retrieved, some when they are
    garbage-collected at exit. A failed read (a damaged checkpoint) leaves orbax's
    other reads of it pending in a closed loop: when they are collected, each
    raises again from its coroutine's close (a traceback with a whole TensorStore
    spec, up to thousands of lines). The failure itself is reported in one line
    (WriteFailed, or the warning of restore_newest); these echoes of it are
    dropped, anything else passes."""

    def __init__(self):
        self._previous = None

    def install(self) -> None:
        """Idempotent; installs again where something else (a test runner) has set
        sys.unraisablehook since."""
        if sys.unraisablehook != self._unraisable:
            self._previous = sys.unraisablehook
            sys.unraisablehook = self._unraisable
        logging.getLogger("asyncio").addFilter(self._about_orbax_tasks)

    def _unraisable(self, info) -> None:
        closed = isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(
            info.exc_value
        )
        if not (closed or _from_orbax(info.object)):
            self._previous(info)

    @staticmethod
    def _about_orbax_tasks(record: logging.LogRecord) -> bool:
        # "Task exception was never retrieved" / "Task was destroyed but it is pending!",
        # followed by the task, whose coroutine names its file
        return not _mentions_orbax(record.getMessage())


def _from_orbax(thing) -> bool:
    """Whether `thing` (an unraisable's object) is orbax's or tensorstore's: its
    repr says so, or it is a coroutine defined in their files."""
    code = getattr(thing, "cr_code", None)
    return _mentions_orbax(repr(thing)) or (code is not None and _mentions_orbax(code.co_filename))


def _mentions_orbax(text: str) -> bool:
    text = text.lower()  # "TensorStore details", "OCDBT database"
    return any(mark in text for mark in ("orbax", "tensorstore", "ocdbt", "os_error_code"))


_quiet_echoes = _QuietOrbaxEchoes()

# Times the steps are listed again when the one being read is deleted meanwhile.
RELISTS = 3


def step_folders(directory: pathlib.Path) -> list[int]:
    """Steps that have a folder in `directory`, complete or not (an empty `70/` is
    one too; orbax's temporary folders and set-aside ones are not)."""
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [int(p.name) for p in entries if p.name.isdigit() and p.is_dir()]


def attempt_restore(restore, *args) -> tuple[object, str | None]:
    """(restore(*args), None), or (None, why it failed in short): any error while reading
    counts (orbax, tensorstore, the files). orbax's warnings are off meanwhile, and
    after a failure its reads left pending are collected at once, while their
    echoes are dropped (at exit sys.unraisablehook may be gone already)."""
    _quiet_echoes.install()
    try:
        with _quiet_orbax():
            return restore(*args), None
    except Exception as e:  # noqa: BLE001 -- any failure to read it: orbax, tensorstore, files
        if "RESOURCE_EXHAUSTED" in str(e).split("\n", 1)[0]:
            raise  # out of memory: the checkpoint is not damaged, never set it aside
        failure = _read_failure(e)
    gc.collect()  # here, not in the except block: the error holds the pending reads' frames
    return None, failure


def _read_failure(error: Exception) -> str:
    """Why a read failed, in short: orbax wraps tensorstore's error ("OUT_OF_RANGE:
    Error reading ...: Requested byte range [a, b) is not valid for value of size
    n") in one that names the array's index and dumps a TensorStore spec: the
    cause says it, less the checkpoint's path (the caller names it)."""
    cause = error.__cause__
    if str(error).startswith("Encountered error while reading") and cause is not None:
        return _short(cause, re.sub(r' in OCDBT database at local file "[^"]*"', "", str(cause)))
    return _short(error)


def restore_newest(directory: pathlib.Path, list_steps, restore, flag: str):
    """(step, restore(step), damaged) for the newest of `list_steps()` (steps of the
    checkpoints in `directory`) that restores, None if there is none at all.
    damaged: [(step, why)] of the newer ones, still there, that do not restore,
    newest first; nothing is renamed or deleted here. A step whose folder is gone
    when its read fails was deleted meanwhile (a run that is training keeps only
    its newest checkpoints): the steps are listed again, at most RELISTS times.
    ConfigError (naming `flag`) if none restores."""
    failures: dict[int, str] = {}
    for _ in range(1 + RELISTS):
        vanished = False
        for step in sorted(set(list_steps()) - failures.keys(), reverse=True):
            restored, failure = attempt_restore(restore, step)
            if failure is None:
                damaged = [
                    (s, why)
                    for s, why in sorted(failures.items(), reverse=True)
                    if s > step and (directory / str(s)).exists()
                ]
                return step, restored, damaged
            if not (directory / str(step)).exists():
                vanished = True
                break
            failures[step] = failure
        if not vanished:
            break
    if not failures:
        return None
    newest = max(failures)
    raise ConfigError(
        f"{flag}: no checkpoint in {directory} restores (tried steps "
        f"{', '.join(str(s) for s in sorted(failures, reverse=True))}; step {newest}: "
        f"{failures[newest]})"
    )


def _short(error: Exception, message: str | None = None) -> str:
    """The exception's type and the first line of its message (or of `message`), at
    most ~160 characters."""
    lines = (str(error) if message is None else message).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs that carry the shardings a restore should produce."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )


# -- reading a run (generate, convert, --init-from, analysis scripts): nothing written


def latest_step(directory: pathlib.Path) -> int | None:
    """The newest complete checkpoint in `directory` (None if none); writes nothing."""
    if not directory.is_dir():
        return None
    manager = _manager(directory)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def read_arrays(
    path: pathlib.Path, wanted: dict, flag: str, *, step: int | None = None, log=print
) -> tuple[int, dict]:
    """(step, arrays): the arrays `wanted` ({"params": ..., "rest": ..., ...} of
    ShapeDtypeStructs with shardings) restored from the run `path`'s checkpoint
    `step`, straight into those shardings; without `step`, from its newest
    checkpoint that restores (restore_newest: each newer one that does
    not is named in one warning line through `log`, and left as it is). Reads
    only, so a run that is training may be read. ConfigError if there is no such
    checkpoint or it does not restore."""
    directory = run_checkpoints(path).absolute()
    if step is None:
        return _read_newest(path, directory, wanted, flag, log)
    if step not in step_folders(directory):
        raise ConfigError(f"{flag} {path}: no checkpoint {step} (there: {_steps_there(directory)})")
    arrays, failure = attempt_restore(_reader(wanted, directory), step)
    if failure is None:
        return step, arrays
    if not (directory / str(step)).exists():
        raise ConfigError(
            f"{flag} {path}: checkpoint {step} was deleted while it was read (a run that "
            f"trains keeps only its newest checkpoints; there now: {_steps_there(directory)})"
        )
    raise ConfigError(f"{flag} {path}: checkpoint {step} does not restore ({failure})")


def _read_newest(path, directory, wanted, flag, log) -> tuple[int, dict]:
    """read_arrays without a step: the newest checkpoint that restores."""
    found = restore_newest(
        directory, lambda: step_folders(directory), _reader(wanted, directory), flag
    )
    if found is None:
        raise ConfigError(f"{flag} {path}: no complete checkpoint yet")
    step, arrays, damaged = found
    for bad, why in damaged:
        log(
            f"warning: checkpoint {bad} in {directory} does not restore ({why}); "
            f"read {step} instead, left the run as it is"
        )
    return step, arrays


def _reader(wanted: dict, directory: pathlib.Path):
    """step -> the arrays `wanted` of that checkpoint's train state (any error raised)."""

    def read(step: int) -> dict:
        with ocp.PyTreeCheckpointer() as reader:
            return reader.restore(
                directory / str(step) / STATE,
                args=ocp.args.PyTreeRestore(
                    item=wanted,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
                    partial_restore=True,
                ),
            )

    return read


def _steps_there(directory: pathlib.Path) -> str:
    return ", ".join(map(str, sorted(step_folders(directory)))) or "none"


def read_state(run: pathlib.Path, step: int | None = None) -> dict:
    """The train state of the run `run`'s checkpoint `step` (default: the newest
    complete one) as saved, with no target to lay it out: nested dicts of NumPy
    arrays (nnx states keep their {'value': array} wrappers). For analysis
    scripts; a run resumes through Checkpointer."""
    directory = run_checkpoints(run).absolute()
    if step is None:
        step = latest_step(directory)
        if step is None:
            raise ConfigError(f"{run}: no complete checkpoint in {directory}")
    return ocp.StandardCheckpointer().restore(directory / str(step) / STATE)
