"""Files kdistill writes: atomic writes, the names inside a run folder, and the user cache folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


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


def save_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    The temporary name carries the process id, so two processes writing the same file never share one.
    """
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write(tmp)
    default_permissions(tmp)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_atomic(path: Path, data: str | bytes) -> None:
    """``path``'s new contents, text (UTF-8) or bytes, written with ``save_atomic``."""
    raw = data.encode() if isinstance(data, str) else data
    save_atomic(path, lambda tmp: tmp.write_bytes(raw))
