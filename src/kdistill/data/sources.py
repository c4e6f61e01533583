"""Read raw rows from a local file, a hub dataset or the built-in set.

Every reader returns a list of plain dicts. Problems name the file and, for JSONL, the line; a JSONL
file's rows also carry their line numbers (`Rows.lines`), so that later checks name the line too.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from kdistill.errors import KdistillError

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_SETS = {"quickstart": BUILTIN_DIR / "quickstart.jsonl"}
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class Rows(list):
    """The rows of a JSONL file, with the 1-based file line of each (blank lines are skipped)."""

    lines: list[int]


def where(source: str, rows: list[dict[str, Any]], index: int) -> str:
    """Row `index` of `rows` as a user finds it: `FILE:LINE` for JSONL, else `SOURCE: row N` (1-based)."""
    lines = getattr(rows, "lines", None)
    return f"{source}:{lines[index]}" if lines else f"{source}: row {index + 1}"


def load_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of `source`: `builtin:NAME`, a local file, or a hub dataset id (through `datasets`)."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_SETS:
            raise KdistillError(f"unknown built-in dataset '{name}'; available: {', '.join(BUILTIN_SETS)}")
        return read_jsonl(BUILTIN_SETS[name])
    path = Path(source).expanduser()
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        return _read_local(path)
    return _read_hub(source, split)


def _read_local(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        raise KdistillError(f"{path} is a folder; data.source must be a data file")
    if not path.is_file():
        raise KdistillError(f"data file not found: {path}")
    readers = {".jsonl": read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise KdistillError(
            f"{path}: unsupported file type '{path.suffix}'; expected one of {', '.join(readers)}"
        )
    try:
        return readers[path.suffix](path)
    except UnicodeDecodeError:
        raise KdistillError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except OSError as err:
        raise KdistillError(f"{path}: cannot be read ({err.strerror})") from None


def read_jsonl(path: Path) -> Rows:
    rows = Rows()
    rows.lines = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark is allowed
            except UnicodeDecodeError:
                raise KdistillError(f"{path}:{number}: not UTF-8 text; save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise KdistillError(
                    f"{path}:{number}: malformed JSON line ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(row, dict):
                raise KdistillError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            rows.lines.append(number)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # "-sig": a byte-order mark is allowed
    except json.JSONDecodeError as err:
        raise KdistillError(
            f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise KdistillError(f'{path}: expected a JSON list of objects (or {{"data": [...]}})')
    return data


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8-sig", newline="") as handle:  # else a BOM joins the first column name
        reader = csv.DictReader(handle)
        limit = csv.field_size_limit(2**31 - 1)  # the default, 128 KiB a field, refuses long documents
        try:
            return list(reader)
        except csv.Error as err:
            raise KdistillError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
        finally:
            csv.field_size_limit(limit)


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq  # pyarrow comes with `datasets`

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise KdistillError(f"{path}: not a readable parquet file ({err})") from None


def _read_hub(name: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as err:  # offline, unknown id, unknown split: all surface as different types
        raise KdistillError(
            f"dataset '{name}' could not be loaded from the hub ({type(err).__name__}: {str(err)[:200]}); "
            "give a local .jsonl/.json/.csv/.parquet file, `builtin:quickstart`, or check the id and network"
        ) from None
