"""Files muonjax did not write (a manifest's shards, a checkpoint's index and
tensors, a run's config.json) opened safely, and folders written whole or not
at all. The ground floor of models/ and train/: it imports nothing of ours.

- A file a manifest or an index names is a plain file name inside its folder
  (`is_plain_name`): no separator, not '.' or '..', no NUL, hence not absolute.
  A symbolic link in the folder is followed wherever it points: the folder's
  owner made it (the Hugging Face cache links snapshots/REV/FILE to
  ../../blobs/HASH), not the file that names it.
- Only regular files are opened (`regular_file_size`): open() of a FIFO blocks
  forever, and a device never ends.
- A folder is written into `.NAME.partial-PID-NS` next to it and renamed to
  NAME when complete (`written_whole`); one left by a process that is gone (a
  kill -9) is removed by the next writer of NAME (`remove_partials`).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import stat
import time


class NotRegularFile(ValueError):
    """A path that is missing, unreadable, or not a regular file."""


def is_plain_name(name) -> bool:
    """Whether `name` names a file in the folder itself, never one outside it."""
    return type(name) is str and name not in ("", ".", "..") and not set(name) & set("/\\\0")


def regular_file_size(path: str | os.PathLike) -> int:
    """The size of `path`, a regular file once symbolic links are followed;
    NotRegularFile (naming it and what it is) otherwise, before anything opens it."""
    try:
        mode, size = (info := os.stat(path)).st_mode, info.st_size
    except FileNotFoundError:
        raise NotRegularFile(f"{path} not found") from None
    except OSError as e:
        raise NotRegularFile(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise NotRegularFile(f"{path} is not a regular file (it is {_kind(mode)})")
    return size


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "a special file")


def partial_folder(out: str | os.PathLike) -> pathlib.Path:
    """A new folder name next to `out` for this process to write `out` into."""
    out = pathlib.Path(out)
    return out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"


def _partials(out: pathlib.Path) -> dict[pathlib.Path, int]:
    """The partial folders of `out` (partial_folder's names), with their process ids."""
    name = re.compile(rf"\.{re.escape(out.name)}\.partial-(\d+)-\d+")
    try:
        entries = list(out.parent.iterdir())
    except OSError:  # no parent yet: no partial folder either
        return {}
    return {path: int(m[1]) for path in entries if (m := name.fullmatch(path.name))}


def _process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (signal 0 sends nothing, only checks)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # none has it, or no process id is so large
        return False
    except PermissionError:  # another user's
        return True
    return True


def remove_partials(out: str | os.PathLike, *, mine: bool = False) -> None:
    """Removes the partial folders of `out` whose process is gone (a kill -9 leaves
    one), or with `mine` this process's (a signal's clean-up); others' are left."""
    for path, pid in _partials(pathlib.Path(out)).items():
        if (pid == os.getpid()) if mine else not _process_alive(pid):
            for _ in range(3):  # again if the writing thread added a file meanwhile
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def written_whole(out: str | os.PathLike):
    """Yields a path that does not exist yet, in a new partial folder next to `out`,
    at which to write `out`; renames it to `out` when the block ends without an
    error, so that `out` appears whole or not at all, and removes the partial
    folder in any case (first, those of processes that are gone). OSError if the
    folder cannot be made; FileExistsError if `out` appeared meanwhile."""
    out = pathlib.Path(out)
    remove_partials(out)
    partial = partial_folder(out)
    partial.mkdir(parents=True)
    try:
        yield partial / out.name
        if os.path.lexists(out):  # rename would replace an empty folder, or fail on a link
            raise FileExistsError(f"{out} was created meanwhile")
        os.rename(partial / out.name, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
