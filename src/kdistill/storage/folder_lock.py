"""One run folder, one run: an OS-level lock on `output_dir` for as long as a run uses it.

The lock is `fcntl.flock` on `output_dir/.kdistill.lock`. The kernel releases it when the process
that holds it ends, however it ends (SIGKILL included), so a lock left by a killed run never blocks
the next one. The holder writes its pid, host and start time into the file, so that a run refused
at the door can name it. flock is called directly (a few lines) rather than through `filelock`, so
that the locked file itself carries the holder's details for the refused run's message.

A run that ends removes the lock file while it still holds the lock; a process that locked the
file just before it was removed sees that the path no longer names the file it locked, and locks
the new one instead (`lock_run_folder`). Where `fcntl` does not exist (Windows), or the file system
refuses locks, runs are not locked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from kdistill.errors import KdistillError
from kdistill.files import RunFiles

log = logging.getLogger("kdistill")

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class FolderLock:
    """The lock a run holds on its folder; a context manager that releases it on exit.

    A lock with no file (`FolderLock(None)`) holds nothing: processes other than the main one
    under `accelerate launch`, and systems without `fcntl`.
    """

    def __init__(self, path: Path | None, fd: int | None = None, created: bool = False) -> None:
        self.path, self._fd, self._created = path, fd, created

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file, then unlock; remove the folder too if this run created it and left
        it empty (a run refused on bad input leaves nothing behind)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still locked: see the module's docstring
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None
        if self._created:
            with contextlib.suppress(OSError):  # not empty: the run wrote its outputs
                self.path.parent.rmdir()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_folder(out: Path, main: bool = True) -> FolderLock:
    """Lock `out` for this run (creating it), or refuse at once, naming the run that holds it.

    Only the main process takes the lock (`main`); other processes get a lock that holds nothing.
    """
    if not main or fcntl is None:
        return FolderLock(None)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / RunFiles.LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise KdistillError(busy_message(out, holder)) from None
        except OSError as err:  # a file system without locks (some network mounts)
            os.close(fd)
            log.warning("cannot lock output_dir %s (%s): another run could use it at the same time", out, err)
            return FolderLock(None)
        if _names_file(path, fd):
            break
        os.close(fd)  # the holder removed this file as it ended: lock the one at `path` now
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    return FolderLock(path, fd, created)


def busy_message(out: Path, holder: dict) -> str:
    """What a run refused at a locked folder prints: who holds it, and what to do."""
    pid = holder.get("pid")
    if pid is None:  # the holder locked the file a moment ago and has not written into it yet
        who = "another kdistill run"
    else:
        who = f"another kdistill run, process {pid} on {holder.get('host', 'this machine')}"
        who += f" (started {holder['since']})" if "since" in holder else ""
    stop = f" (kill {pid})" if pid is not None else ""
    return (
        f"output_dir {out} is in use by {who}; nothing was changed. Wait for that run to end or stop "
        f"it{stop}, then run this command again, or choose another output_dir"
    )


def _read_holder(fd: int) -> dict:
    try:
        found = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _names_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)
