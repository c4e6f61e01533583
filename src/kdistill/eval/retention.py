"""Retention above chance: how much of the teacher's lead over guessing the student kept.

For each benchmark task, with the task's chance accuracy `c` (`tasks.CHANCE`), the student's accuracy
`s` and the teacher's `t` (acc_norm where the task has it, else acc):

    kept = (s - c) / (t - c)

A student at chance keeps 0 and one below chance a negative share; the share is not clipped, so that
the noise of a student near chance averages out instead of counting upward. The overall retention is
the mean of `kept` over the tasks where the teacher is at least `MARGIN` (5 accuracy points) above
chance. A task where the teacher itself is near chance has no lead to keep: it is left out of the
mean, never counted as kept.

The mean's standard error is the student's sampling error carried through: `stderr(s) / (t - c)` per
task, combined over the n counted tasks as `sqrt(sum of squares) / n`. The teacher, measured on the
same items, is the reference and adds none.
"""

from __future__ import annotations

import math
from typing import Any

from kdistill.eval.tasks import CHANCE

MARGIN = 0.05  # the teacher's lead over chance, in accuracy, for a task to count


def primary_metric(scores: dict[str, float]) -> str:
    """The accuracy a task is judged on: acc_norm where lm-eval reports it, else acc."""
    return "acc_norm" if "acc_norm" in scores else "acc"


def task_retention(student: float, teacher: float, chance: float, margin: float = MARGIN) -> float | None:
    """`(student - chance) / (teacher - chance)`; None where the teacher leads chance by less than
    `margin` (or either accuracy is missing)."""
    # Rounded: 0.30 - 0.25 is 0.04999... in floating point, and a lead of exactly `margin` counts.
    if not (math.isfinite(student) and math.isfinite(teacher)) or round(teacher - chance, 9) < margin:
        return None
    return (student - chance) / (teacher - chance)


def retention(tasks: dict[str, dict[str, Any]], margin: float = MARGIN) -> dict[str, Any]:
    """Per task and overall retention from `eval.json`'s `benchmarks.tasks` (see the module docstring).

    Returns `{"margin", "mean", "mean_stderr", "counted": [TASK, ...], "tasks": {TASK: {"metric",
    "chance", "student", "student_stderr", "teacher", "teacher_stderr", "kept"}}}`; `mean` and
    `mean_stderr` are None when no task counts. Tasks without a teacher score or a known chance level
    are left out.
    """
    rows: dict[str, dict[str, Any]] = {}
    for task, scores in tasks.items():
        if "teacher" not in scores or task not in CHANCE:
            continue
        metric = primary_metric(scores["student"])
        student, teacher = scores["student"][metric], scores["teacher"][metric]
        rows[task] = {
            "metric": metric,
            "chance": CHANCE[task],
            "student": student,
            "student_stderr": scores["student"].get(f"{metric}_stderr"),
            "teacher": teacher,
            "teacher_stderr": scores["teacher"].get(f"{metric}_stderr"),
            "kept": task_retention(_number(student), _number(teacher), CHANCE[task], margin),
        }
    counted = [task for task, row in rows.items() if row["kept"] is not None]
    if not counted:
        return {"margin": margin, "mean": None, "mean_stderr": None, "counted": [], "tasks": rows}
    mean = sum(rows[t]["kept"] for t in counted) / len(counted)
    spread = [_number(rows[t]["student_stderr"]) / (rows[t]["teacher"] - rows[t]["chance"]) for t in counted]
    stderr = math.sqrt(sum(x * x for x in spread)) / len(counted)
    return {"margin": margin, "mean": mean, "mean_stderr": stderr, "counted": counted, "tasks": rows}


def _number(value: Any) -> float:
    # eval.json writes a metric that could not be computed as null.
    return float("nan") if value is None else float(value)
