"""Benchmark tasks for lm-evaluation-harness: local files read by kdistill, or lm-eval's own tasks.

Each local task is an lm-eval 0.4 task config (a plain dict, the same keys as a task YAML). Its data comes
through lm-eval's `custom_dataset` hook from the readers below, which check every row and name the
file and line of a bad one, instead of through `dataset_path: json`, whose errors come from deep
inside `datasets` (and which cannot read HellaSwag's 6-line text format or give MMLU rows a subject).

Where the data comes from (`benchmark_source`): `--data-dir`, else the folder in `$KDISTILL_EVAL_DATA`,
else, when the hub answers, lm-eval's own tasks of the same benchmarks. The local files are:
- multiple choice jsonl rows `{"query", "choices", "gold"}`, `gold` the index of the right choice;
- Winogrande `{"context_options", "continuation", "gold"}`: partial scoring, the context under which
  the continuation is likeliest wins (lm-eval's `winogrande`);
- HellaSwag, bz2 text, 6 lines a task: `activity: context`, gold index, 4 endings;
- MMLU, `{dev,test}/SUBJECT_{dev,test}.csv` with header `question,choice0..choice3,answer`.

Prompts follow lm-eval's own task YAMLs for the same benchmarks (`Question: ...\\nAnswer:` and so on).
"""

from __future__ import annotations

import bz2
import csv
import difflib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdistill.errors import KdistillError
from kdistill.models.loading import hub_reachable

Row = dict[str, Any]

# task name -> (file under the data folder, lm-eval doc_to_text, metrics); acc_norm where lm-eval has it
_MULTIPLE_CHOICE: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "arc_easy": ("arc_easy.jsonl", "{{query}}\nAnswer:", ("acc", "acc_norm")),
    "piqa": ("piqa.jsonl", "{{query.strip()}}\nAnswer:", ("acc", "acc_norm")),
    "commonsense_qa": ("commonsense_qa.jsonl", "{{query}}", ("acc",)),
    "boolq": ("boolq.jsonl", "{{query}}\nAnswer:", ("acc",)),
    "openbook_qa": ("openbook_qa.jsonl", "{{query}}", ("acc", "acc_norm")),
    "copa": ("copa.jsonl", "{{query}}", ("acc",)),
}
TASK_NAMES = (*_MULTIPLE_CHOICE, "winogrande", "hellaswag", "mmlu")
# lm-eval's names of the same benchmarks, for its own tasks (read from the hub)
LM_EVAL_NAMES = {name: name for name in TASK_NAMES} | {"openbook_qa": "openbookqa"}
# The accuracy of a uniform random pick: 1 / choices (ARC has 3-5 choices, almost all 4).
CHANCE = {
    "arc_easy": 0.25,
    "piqa": 0.5,
    "commonsense_qa": 0.2,
    "boolq": 0.5,
    "openbook_qa": 0.25,
    "copa": 0.5,
    "winogrande": 0.5,
    "hellaswag": 0.25,
    "mmlu": 0.25,
}
EVAL_DATA_ENV = "KDISTILL_EVAL_DATA"
LM_EVAL_HUB = "lm-eval"  # the source that means lm-eval's own tasks
NO_DATA = (
    "no benchmark data: give --data-dir FOLDER or set KDISTILL_EVAL_DATA=FOLDER (files in the formats of "
    "docs/eval.md), or run online to use lm-eval's own tasks"
)


def benchmark_source(data_dir: str | None) -> Path | str | None:
    """Where benchmark data comes from: `data_dir`, else `$KDISTILL_EVAL_DATA`, else `LM_EVAL_HUB` when
    the hub answers; None when none of them is there. A folder is made absolute, so that eval.json
    names it one way however it was given (`--teacher-scores` compares them)."""
    folder = data_dir or os.environ.get(EVAL_DATA_ENV)
    if folder:
        return Path(folder).resolve()
    return LM_EVAL_HUB if hub_reachable() else None


MMLU_LETTERS = ["A", "B", "C", "D"]


def read_multiple_choice(path: Path) -> list[Row]:
    """Rows `{"query", "choices", "gold"}` of a jsonl file, each checked."""
    rows = []
    for number, row in _jsonl(path):
        _need(row, {"query": str, "choices": list, "gold": int}, path, number)
        _check_gold(row["gold"], len(row["choices"]), path, number)
        rows.append({"query": row["query"], "choices": [str(c) for c in row["choices"]], "gold": row["gold"]})
    return rows


def read_winogrande(path: Path) -> list[Row]:
    """Rows `{"context_options", "continuation", "gold"}`, each checked."""
    rows = []
    for number, row in _jsonl(path):
        _need(row, {"context_options": list, "continuation": str, "gold": int}, path, number)
        _check_gold(row["gold"], len(row["context_options"]), path, number)
        rows.append({k: row[k] for k in ("context_options", "continuation", "gold")})
    return rows


def read_hellaswag(path: Path) -> list[Row]:
    """HellaSwag's 6-line tasks as `{"query", "choices", "gold"}`, cleaned as lm-eval's `hellaswag` does."""
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if len(lines) % 6:
        raise KdistillError(f"{path}: {len(lines)} lines; expected 6 a task (context, gold, 4 endings)")
    rows = []
    for start in range(0, len(lines), 6):
        gold = lines[start + 1].strip()
        if gold not in {"0", "1", "2", "3"}:
            raise KdistillError(f"{path}:{start + 2}: gold {gold!r}; expected an index 0-3")
        endings = [_clean_hellaswag(e) for e in lines[start + 2 : start + 6]]
        rows.append({"query": _clean_hellaswag(lines[start]), "choices": endings, "gold": int(gold)})
    return rows


def read_mmlu(folder: Path, split: str) -> list[Row]:
    """Every subject's rows of `folder/split`, as `{"question", "choices", "gold", "subject"}`.

    Subjects are interleaved (one row of each in turn), so that `--limit N` samples every subject
    rather than the first one alphabetically.
    """
    files = sorted((folder / split).glob(f"*_{split}.csv"))
    if not files:
        raise KdistillError(f"{folder / split}: no *_{split}.csv files (MMLU, one CSV a subject)")
    subjects = [_mmlu_subject(f, split) for f in files]
    rows = []
    for depth in range(max(len(s) for s in subjects)):
        rows += [s[depth] for s in subjects if depth < len(s)]
    return rows


def _mmlu_subject(path: Path, split: str) -> list[Row]:
    subject = path.name.removesuffix(f"_{split}.csv").replace("_", " ")
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        expected = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
        if reader.fieldnames != expected:
            raise KdistillError(f"{path}:1: header {reader.fieldnames}; expected {','.join(expected)}")
        for number, row in enumerate(reader, start=2):
            answer = (row["answer"] or "").strip()
            if answer not in {"0", "1", "2", "3"}:
                raise KdistillError(f"{path}:{number}: answer {answer!r}; expected an index 0-3")
            choices = [row[f"choice{i}"] for i in range(4)]
            rows.append(
                {"question": row["question"], "choices": choices, "gold": int(answer), "subject": subject}
            )
    return rows


def parse_tasks(text: str) -> list[str]:
    """`"all"`, `"none"` or comma-separated task names, checked."""
    names = {"all": list(TASK_NAMES), "none": []}.get(text, [n.strip() for n in text.split(",") if n.strip()])
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown:  # every name must resolve: the others would run without a word about the one dropped
        close = {n: difflib.get_close_matches(n, TASK_NAMES, n=1, cutoff=0.5) for n in unknown}
        hints = "".join(f"; did you mean {c[0]!r} for {n!r}?" for n, c in close.items() if c)
        raise KdistillError(
            f"unknown task(s) {unknown}{hints}; known tasks: {', '.join(TASK_NAMES)} (or all, none)"
        )
    if not names and text != "none":
        raise KdistillError(f"--tasks {text!r} names no task; give task names, all or none")
    return names


def task_configs(names: list[str], source: str | Path) -> list[dict[str, Any] | str]:
    """lm-eval tasks for `names`: configs reading their files from the folder `source`, or lm-eval's own
    task names when `source` is `LM_EVAL_HUB`."""
    parse_tasks(",".join(names))
    if source == LM_EVAL_HUB:
        return [LM_EVAL_NAMES[name] for name in names]
    data_dir = Path(source)
    if not data_dir.is_dir():
        raise KdistillError(f"benchmark data {data_dir}: no such folder (expected the files of docs/eval.md)")
    return [_config(name, data_dir) for name in names]


def _config(name: str, data_dir: Path) -> dict[str, Any]:
    base = {
        "task": f"kdistill_{name}",
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metadata": {"version": 1.0},
    }
    if name in _MULTIPLE_CHOICE:
        file, text, metrics = _MULTIPLE_CHOICE[name]
        return {
            **base,
            **_source(read_multiple_choice, data_dir / file),
            "doc_to_text": text,
            **_metrics(metrics),
        }
    if name == "winogrande":
        # Partial scoring: doc_to_text gives the gold index, the choices are the contexts, and the target
        # is the shared continuation (lm-eval's own winogrande task is written the same way).
        source = _source(read_winogrande, data_dir / "winogrande.jsonl")
        return {**base, **source, "doc_to_text": "gold", "doc_to_choice": "context_options",
                "doc_to_target": "continuation", **_metrics(("acc",))}  # fmt: skip
    if name == "hellaswag":
        source = _source(read_hellaswag, data_dir / "hellaswag_val.txt.bz2")
        return {**base, **source, "doc_to_text": "{{query}}", **_metrics(("acc", "acc_norm"))}
    return _mmlu_config(base, data_dir / "mmlu")


def _mmlu_config(base: dict[str, Any], folder: Path) -> dict[str, Any]:
    options = "".join(f"\n{letter}. {{{{choices[{i}]}}}}" for i, letter in enumerate(MMLU_LETTERS))
    return {
        **base,
        # One task over all 57 subjects: its accuracy is the mean over questions, as lm-eval's `mmlu`
        # group reports it (weighted by subject size).
        "custom_dataset": _MmluData(folder),
        "fewshot_split": "dev",
        "description": "The following are multiple choice questions (with answers) about {{subject}}.\n\n",
        "doc_to_text": "{{question.strip()}}" + options + "\nAnswer:",
        "doc_to_choice": MMLU_LETTERS,
        **_metrics(("acc",)),
    }


def _source(reader: Callable[[Path], list[Row]], path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise KdistillError(f"benchmark file not found: {path}")
    return {"custom_dataset": _LocalData(reader, path)}


class _LocalData:
    """lm-eval's `custom_dataset` hook: called with the task's metadata, returns a `DatasetDict`."""

    def __init__(self, reader: Callable[[Path], list[Row]], path: Path) -> None:
        self.reader, self.path = reader, path

    def __call__(self, **_metadata: Any) -> Any:
        from datasets import Dataset, DatasetDict

        return DatasetDict({"test": Dataset.from_list(self.reader(self.path))})


class _MmluData:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, **_metadata: Any) -> Any:
        from datasets import Dataset, DatasetDict

        return DatasetDict({s: Dataset.from_list(read_mmlu(self.folder, s)) for s in ("test", "dev")})


def _metrics(names: tuple[str, ...]) -> dict[str, Any]:
    return {"metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in names]}


def _jsonl(path: Path) -> list[tuple[int, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise KdistillError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if not rows:
        raise KdistillError(f"{path}: no rows")
    return rows


def _need(row: Any, fields: dict[str, type], path: Path, number: int) -> None:
    if not isinstance(row, dict):
        raise KdistillError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    for key, kind in fields.items():
        if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
            got = "missing" if key not in row else f"{type(row[key]).__name__} {row[key]!r}"[:80]
            raise KdistillError(f"{path}:{number}: key '{key}' is {got}; expected {kind.__name__}")


def _check_gold(gold: int, count: int, path: Path, number: int) -> None:
    if not 0 <= gold < count:
        raise KdistillError(f"{path}:{number}: gold {gold} is not an index of the {count} choices")


def _clean_hellaswag(text: str) -> str:
    # lm-eval's hellaswag preprocessing: WikiHow "[title]" markers become sentence breaks, other
    # bracketed markers go, double spaces collapse.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")
