"""One writer per run directory: an OS advisory lock (flock) on a file in --out.

The lock is held for the whole run and released when it ends, on an exception
too; the kernel drops it when the process dies, even by SIGKILL, so a crashed
run never blocks its own --resume. A second run on the same --out fails at once
with a ConfigError (one line, exit code 2 from the CLI) and writes nothing.

Multi-host: every process of a run locks a file of its own (`.lock` for
process 0, `.lock.N` for process N). Two runs on one --out collide on every
index they share, so each process of the second run stops before set-up,
instead of process 0 alone stopping and the others waiting on it in a
collective; and where each host has its own (unshared) --out, each still
guards its own. Processes of one run never contend with each other.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import socket
import time

from muonjax.train.errors import ConfigError
from muonjax.train.rundir import LOCK_FILE


def lock_name(process: int = 0) -> str:
    """The lock file's name in --out for process `process` of a run."""
    return LOCK_FILE if process == 0 else f"{LOCK_FILE}.{process}"


def is_lock_file(name: str) -> bool:
    """Whether `name` (an entry of --out) is a run lock: such files do not make --out 'used'."""
    return name == LOCK_FILE or (
        name.startswith(LOCK_FILE + ".") and name[len(LOCK_FILE) + 1 :].isdigit()
    )


def _holder(fd: int, wait: float = 1.0) -> str:
    """' (pid N)' or ' (pid N on HOST)' from the lock file, '' if still not written
    after `wait` seconds (the holder writes it right after it takes the lock; on a
    busy machine that can be a little later)."""
    deadline = time.monotonic() + wait
    while not (found := _read_holder(fd)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid, _, host = os.read(fd, 512).decode(errors="replace").strip().partition(" ")
    except OSError:
        return ""
    if not pid.isdigit():
        return ""
    return f" (pid {pid})" if host in ("", socket.gethostname()) else f" (pid {pid} on {host})"


class RunLock:
    """`with RunLock(out, process):` holds the run lock of `out` for the block.

    Creates `out` (and missing parents) if needed to hold the lock file; on
    release it deletes the lock file and any of those folders left empty, so a
    run that failed before writing anything leaves nothing behind. If the file
    system does not support flock, warns through `log` and runs unlocked."""

    def __init__(self, out, process: int = 0, log=print):
        self.out = pathlib.Path(out)
        self.path = self.out / lock_name(process)
        self.log = log
        self._fd: int | None = None
        self._created: list[pathlib.Path] = []  # folders this lock created, deepest first

    def __enter__(self) -> RunLock:
        if self.out.exists() and not self.out.is_dir():
            return self  # not a folder: no run can use it; set-up says so in its own words
        for _ in range(100):  # retry if a releasing run deleted the file or folder under us
            self._make_folders()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue
            except OSError as e:
                self._remove_folders()
                raise ConfigError(
                    f"--out {self.out}: cannot create {self.path.name} ({e.strerror})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)  # e.g. ENOLCK: a file system without flock
                    self.log(
                        f"{self.out}: warning: cannot lock {self.path.name} ({e.strerror}); "
                        "nothing stops another run from using this --out at the same time"
                    )
                    self._release_folders_only()
                    return self
                holder = _holder(fd)
                os.close(fd)
                self._remove_folders()
                raise ConfigError(
                    f"--out {self.out} is in use by another run{holder}; "
                    "wait for it or choose another --out"
                ) from None
            if self._same_file(fd):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
                self._fd = fd
                return self
            os.close(fd)  # locked a file its holder had deleted on release: take the new one
        raise ConfigError(f"--out {self.out}: could not take {self.path.name}; try again")

    def _same_file(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)

    def _make_folders(self) -> None:
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {self.out}: cannot create it ({e.strerror})") from None
        self._created = missing or self._created

    def _remove_folders(self) -> None:
        for folder in self._created:  # deepest first; stops at the first one not empty
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def _release_folders_only(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass
        self._remove_folders()

    def release(self) -> None:
        """Deletes the lock file (while still holding it) and unlocks; idempotent."""
        if self._fd is None:
            return
        try:
            self.path.unlink()  # before unlocking: a waiter on this file sees it gone and retries
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_folders()

    def __exit__(self, *exc) -> None:
        self.release()
