"""The eval and bench results as tables: rows of strings, drawn as text (CLI) or markdown (report)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from kdistill.eval.runner import mean_kept

Table = tuple[list[str], list[list[str]]]  # headers, rows

TASK_LABELS = {
    "arc_easy": "ARC-Easy",
    "piqa": "PIQA",
    "commonsense_qa": "CommonsenseQA",
    "boolq": "BoolQ",
    "winogrande": "Winogrande",
    "openbook_qa": "OpenBookQA",
    "copa": "COPA",
    "hellaswag": "HellaSwag",
    "mmlu": "MMLU",
}


def number(value: Any) -> str:
    """A metric value for a table: thousands separated when large, 4 significant digits otherwise."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def share(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


NOT_MEANINGFUL = "n/m"  # a benchmark share where the teacher is within two standard errors of chance


def eval_table(result: dict[str, Any]) -> Table:
    """metric | student | teacher | kept, for the held-out metrics and every benchmark accuracy."""
    kept = result.get("kept", {})
    rows = []
    held = result.get("held_out")
    if held:
        student, teacher = held["student"], held.get("teacher", {})
        for key, label, teacher_default in (
            ("ppl", "held-out perplexity", None),
            ("kl", "held-out KL to teacher", 0.0),
            ("top1", "top-1 agreement with teacher", 1.0),
            ("rouge_l", f"ROUGE-L ({held.get('rouge_rows', '?')} generations)", None),
            ("teacher_nll", "teacher NLL of the model's answers", None),
            ("answer_words", "answer length (words)", None),
            ("rep4", "repeated word 4-grams in answers", None),
        ):
            if key in student:
                shown = teacher.get(key, teacher_default if teacher else None)
                cells = [
                    _with_stderr(student, key, number),
                    _with_stderr(teacher, key, number) if key in teacher else number(shown),
                ]
                rows.append([label, *cells, share(kept.get(key))])
    for task, scores in result.get("benchmarks", {}).get("tasks", {}).items():
        for metric in ("acc", "acc_norm"):
            if metric in scores["student"]:
                label = f"{TASK_LABELS.get(task, task)} {metric} (n={int(scores['student']['n'])})"
                teacher = scores.get("teacher")
                rows.append(
                    [
                        label,
                        _with_stderr(scores["student"], metric),
                        _with_stderr(teacher, metric) if teacher else "—",
                        _benchmark_share(kept, f"{task}/{metric}"),
                    ]
                )
    overall = mean_kept(kept)
    if overall is not None:
        rows.append(["mean share kept over benchmarks", "", "", share(overall)])
    if result.get("retention", {}).get("mean") is not None:
        rows.append([_retention_label(result["retention"]), "", "", retention_share(result["retention"])])
    return ["metric", "student", "teacher", "kept"], rows


def retention_share(found: dict[str, Any]) -> str:
    """The mean retention as a share, with its standard error where known."""
    stderr = found.get("mean_stderr")
    return share(found.get("mean")) + ("" if stderr is None else f" ± {stderr * 100:.1f} pts")


ROLES = ("teacher", "student")


def retention_table(evaluation: dict[str, Any], measured: dict[str, Any]) -> Table:
    """Teacher and student side by side, as the KD guide shows them: parameters, size on disk and decode
    tokens/s (from `kdistill bench`, where run), every benchmark with its standard error, and the share
    of the teacher's accuracy above chance the student retained (eval/retention.py)."""
    rows = []
    for key, label, show in (
        ("parameters", "parameters", lambda v: f"{v / 1e6:,.1f} M"),
        ("disk_bytes", "size on disk", _bytes),
        ("generate_tok_s", "decode tokens/s", lambda v: f"{v:,.1f}"),
    ):
        cells = [show(measured[r][key]) if key in measured.get(r, {}) else "—" for r in ROLES]
        ratio = measured.get("ratios", {}).get(key)
        rows.append([label, *cells, "—" if ratio is None else f"student / teacher {ratio:.2f}×"])
    found = evaluation.get("retention", {})
    for task, row in found.get("tasks", {}).items():
        label = f"{TASK_LABELS.get(task, task)} {row['metric']} (chance {row['chance']:.0%})"
        teacher, student = ({"v": row[w], "v_stderr": row[f"{w}_stderr"]} for w in ("teacher", "student"))
        kept = share(row["kept"]) if row["kept"] is not None else "— (teacher < chance + 5 pts)"
        rows.append([label, _with_stderr(teacher, "v"), _with_stderr(student, "v"), kept])
    if found.get("tasks"):
        rows.append([_retention_label(found), "", "", retention_share(found)])
    return ["", "teacher", "student", "retained above chance"], rows


def _retention_label(found: dict[str, Any]) -> str:
    tasks, points = len(found["counted"]), round(found["margin"] * 100)
    return f"retention above chance (mean over {tasks} tasks, teacher ≥ chance + {points} pts)"


def _benchmark_share(kept: dict[str, float | None], key: str) -> str:
    # A key present with no value is a share measured and found not meaningful.
    return NOT_MEANINGFUL if key in kept and kept[key] is None else share(kept.get(key))


def _with_stderr(
    scores: dict[str, float], metric: str, show: Callable[[float], str] = "{:.4f}".format
) -> str:
    """`scores[metric]` written by `show`, with ` ± stderr` where `scores` has `METRIC_stderr`."""
    value, stderr = scores[metric], scores.get(f"{metric}_stderr")
    if value is None:
        return "—"
    return show(value) + ("" if stderr is None else f" ± {show(stderr)}")


def bench_table(result: dict[str, Any]) -> Table:
    """The "Why distill" table of the KD guide behind configs/seed.yaml, measured: values and student /
    teacher ratios."""
    roles = [r for r in ("teacher", "student") if r in result]
    ratios = result.get("ratios", {})
    memory = "peak GPU memory" if "gpu" in result.get("machine", {}) else "peak memory (max RSS)"
    rows = []
    for key, label, show in (
        ("parameters", "parameters", lambda v: f"{v / 1e6:,.1f} M"),
        ("disk_bytes", "size on disk", _bytes),
        ("peak_memory_bytes", memory, _bytes),
        ("prompt_tok_s", "prompt tokens/s", lambda v: f"{v:,.0f}"),
        ("generate_tok_s", "generation tokens/s", lambda v: f"{v:,.1f}"),
    ):
        ratio = ratios.get(key)
        rows.append(
            [label, *(show(result[r][key]) for r in roles), "—" if ratio is None else f"{ratio:.2f}×"]
        )
    return ["", *roles, "student / teacher"], rows


def _bytes(value: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if value >= size:
            return f"{value / size:,.2f} {unit}" if unit == "GiB" else f"{value / size:,.0f} {unit}"
    return f"{value / 2**10:,.0f} KiB"


def text_table(table: Table) -> str:
    """Columns padded with spaces, for a terminal."""
    headers, rows = table
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    # The first column (labels) is left-aligned, the numbers right-aligned.
    lines = [
        "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [headers, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(table: Table) -> str:
    headers, rows = table
    escape = lambda cell: str(cell).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = ["| " + " | ".join(escape(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
