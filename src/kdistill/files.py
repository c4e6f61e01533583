"""Files kdistill writes: atomic writes, the names inside a run folder, and the user cache folder."""

from __future__ import annotations

import errno
import logging
import os
import re
import resource
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from kdistill.errors import KdistillError

log = logging.getLogger("kdistill")

TIGHT = 2.0  # check_space warns below this many times the need: a second checkpoint may not fit


class RunFiles:
    """The names of what a run folder holds, defined once for training, evaluation and the report."""

    CONFIG = "kdistill_config.yaml"  # the resolved config: what makes a folder a run folder
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    CHECKPOINTS = "checkpoints"
    EVAL = "eval.json"
    BENCH = "bench.json"
    REPORT_MD = "report.md"
    REPORT_HTML = "report.html"
    ENGINE = "engine"  # the student's generation engine: the weights it serves and its log
    LOCK = ".kdistill.lock"  # held by the run using the folder (storage/folder_lock.py)


def cache_root() -> Path:
    """kdistill's own cache (converted GGUF models, teacher responses): `$KDISTILL_CACHE` or ~/.cache."""
    return Path(os.environ.get("KDISTILL_CACHE", Path.home() / ".cache" / "kdistill"))


def default_permissions(path: Path) -> None:
    """Give `path` (a file, or every file in a folder) the permissions the umask gives new files.

    safetensors writes its files readable by their owner only (0600), unlike every other file a run
    writes; weights and checkpoints should be as readable as the rest of the run folder.
    """
    mode = 0o666 & ~_umask()
    for item in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        if item.stat().st_mode & 0o777 != mode:
            os.chmod(item, mode)


def _umask() -> int:
    """The process's umask, read without changing it (Linux); else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_atomic(path: Path, write: Callable[[Path], object], what: str = "", kept: str = "") -> None:
    """``write(tmp)`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    The temporary name carries the process id, so two processes writing the same file never share one.
    A failed write removes the temporary file and raises one `KdistillError` (see `writing`) naming
    `what` (default: the file) and `kept` (default: that `path` is unchanged).
    """
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    kept = kept or f"{path.name} is unchanged; the partial file was removed"
    with writing(what or path.name, path, kept, partial=[tmp]):
        write(tmp)
        default_permissions(tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_atomic(path: Path, data: str | bytes) -> None:
    """``path``'s new contents, text (UTF-8) or bytes, written with ``save_atomic``."""
    raw = data.encode() if isinstance(data, str) else data
    save_atomic(path, lambda tmp: tmp.write_bytes(raw))


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds `path` (or the nearest folder above it that exists)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free


def size_text(n: float) -> str:
    """`n` bytes for a message: `512 B`, `3.4 MB`, `12.0 GB` (powers of 1000, as `df -H`)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def is_write_failure(err: BaseException) -> bool:
    """Whether `err` is a failed write: an OSError, safetensors' I/O error, or torch's stream error.

    torch.save on a full disk raises a RuntimeError from its C++ writer (`[enforce fail at
    inline_container.cc] unexpected pos`, chained to `basic_ios::clear: iostream error`), with no errno.
    """
    if isinstance(err, OSError):
        return True
    text = f"{err} {err.__context__ or ''}"
    markers = ("I/O error", "iostream error", "inline_container", "PytorchStreamWriter", "file write failed")
    return isinstance(err, RuntimeError | SafetensorError) and any(m in text for m in markers)


def _reason(err: BaseException) -> str:
    """The OS's reason for a failed write, with its errno name where one can be found.

    torch.save into a Python file object chains the file's OSError as the context of its own error;
    safetensors gives the errno only in its text (`I/O error: File too large (os error 27)`).
    """
    cause = err.__context__ if isinstance(err.__context__, OSError) else err
    code = getattr(cause, "errno", None)
    if code is None:
        match = re.search(r"os error (\d+)", str(err))
        code = int(match.group(1)) if match else None
    if code is None:
        return f"the write failed ({str(err).splitlines()[0][:120]})"
    return f"{os.strerror(code)} [{errno.errorcode.get(code, code)}]"


def _size_limit() -> str:
    """A file-size limit on this process (`ulimit -f`), if any, for the message."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft == resource.RLIM_INFINITY:
        return ""
    return f"; this process may write files of at most {size_text(soft)} (ulimit -f)"


@contextmanager
def writing(
    what: str, where: Path, kept: str | Callable[[], str], partial: Sequence[Path] = ()
) -> Iterator[None]:
    """Turn a failed write inside the block into one `KdistillError` and remove the partial files.

    The message says `what` was being written, `where`, the free space there when it failed and
    after the partial files were removed, and `kept` (what is intact and how to continue; a callable is
    asked only on failure). Any other exception still removes the partial files, and passes on unchanged.
    """
    try:
        yield
    except Exception as err:
        free = free_bytes(where)
        for path in partial:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if not is_write_failure(err):
            raise
        _close_progress_bars()
        raise KdistillError(
            f"could not write {what} to {where}: {_reason(err)}; {size_text(free)} free there when it "
            f"failed, {size_text(free_bytes(where))} after the partial files were removed{_size_limit()}. "
            f"{kept() if callable(kept) else kept}"
        ) from None


def _close_progress_bars() -> None:
    """Close the bars a failed write left open (gguf's writer has one), so the message that follows
    starts a line of its own instead of trailing a half-drawn bar."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def check_space(where: Path, need: int, what: str, key: str) -> None:
    """Refuse when `where` has less than `need` bytes free, warn when less than `TIGHT` times that."""
    free = free_bytes(where)
    if free < need:
        raise KdistillError(
            f"{key} {where}: {size_text(free)} free, but {what} need {size_text(need)}; free some space "
            f"there or choose another {key}"
        )
    if free < TIGHT * need:
        log.warning(
            "%s %s: %s free, and %s need %s: little room is left for anything more written there "
            "(a second checkpoint, logs)",
            key, where, size_text(free), what, size_text(need),
        )  # fmt: skip
