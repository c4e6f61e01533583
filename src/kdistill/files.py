"""Writing a file so that no reader, and no crash, ever sees half of it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def save_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    The temporary name carries the process id, so two processes writing the same file never share one.
    """
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write(tmp)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_atomic(path: Path, data: str | bytes) -> None:
    """``path``'s new contents, text (UTF-8) or bytes, written with ``save_atomic``."""
    raw = data.encode() if isinstance(data, str) else data
    save_atomic(path, lambda tmp: tmp.write_bytes(raw))
