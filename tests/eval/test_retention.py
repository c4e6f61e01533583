"""Retention above chance, averaged over the tasks where the teacher leads chance by 5 points, with
accuracies made by hand."""

from __future__ import annotations

import pytest

from kdistill.eval.retention import MARGIN, primary_metric, retention, task_retention


def _scores(acc: float, stderr: float = 0.02, norm: float | None = None) -> dict[str, float]:
    out = {"acc": acc, "acc_stderr": stderr, "n": 500}
    if norm is not None:
        out |= {"acc_norm": norm, "acc_norm_stderr": stderr}
    return out


def test_task_retention_by_hand() -> None:
    assert MARGIN == 0.05
    assert task_retention(0.45, 0.65, 0.25) == pytest.approx(0.5)  # 0.20 of a 0.40 lead
    assert task_retention(0.25, 0.65, 0.25) == 0.0  # a student at chance keeps nothing
    assert task_retention(0.20, 0.65, 0.25) == pytest.approx(-0.125)  # below chance, not clipped
    assert task_retention(0.70, 0.65, 0.25) == pytest.approx(1.125)  # above the teacher
    assert task_retention(0.29, 0.29, 0.25) is None  # the teacher 4 points above chance: no lead to keep
    assert task_retention(0.25, 0.30, 0.25) == 0.0  # exactly 5 points: counts, and the student kept none
    assert task_retention(0.55, 0.52, 0.5) is None  # never 100 % (or more) of a lead that is not there
    assert task_retention(float("nan"), 0.9, 0.5) is None


def test_retention_over_tasks_by_hand() -> None:
    tasks = {
        # acc_norm is the task's metric where lm-eval has it: (0.40 - 0.25) / (0.55 - 0.25) = 0.5
        "arc_easy": {"student": _scores(0.5, norm=0.40), "teacher": _scores(0.6, norm=0.55)},
        # (0.59 - 0.5) / (0.62 - 0.5) = 0.75
        "piqa": {"student": _scores(0.59), "teacher": _scores(0.62)},
        # the teacher at chance (0.26 vs 0.25): left out of the mean, whatever the student scores
        "mmlu": {"student": _scores(0.31), "teacher": _scores(0.26)},
        # a student at chance on a task the teacher knows: 0 kept, and it counts
        "boolq": {"student": _scores(0.5), "teacher": _scores(0.7)},
        "copa": {"student": _scores(0.6)},  # no teacher score: left out
        "my_task": {"student": _scores(0.6), "teacher": _scores(0.9)},  # no known chance: left out
    }
    found = retention(tasks)
    assert found["counted"] == ["arc_easy", "piqa", "boolq"]
    assert found["mean"] == pytest.approx((0.5 + 0.75 + 0.0) / 3)
    # Every student score has stderr 0.02: per task 0.02 / (t - c), combined as sqrt(sum of squares) / 3.
    spread = [0.02 / 0.30, 0.02 / 0.12, 0.02 / 0.20]
    assert found["mean_stderr"] == pytest.approx(sum(x * x for x in spread) ** 0.5 / 3)
    assert set(found["tasks"]) == {"arc_easy", "piqa", "mmlu", "boolq"}
    arc = found["tasks"]["arc_easy"]
    assert arc == {
        "metric": "acc_norm", "chance": 0.25, "student": 0.40, "student_stderr": 0.02, "teacher": 0.55,
        "teacher_stderr": 0.02, "kept": pytest.approx(0.5),
    }  # fmt: skip
    assert found["tasks"]["mmlu"]["kept"] is None
    assert retention({"mmlu": tasks["mmlu"]}) == {
        "margin": 0.05, "mean": None, "mean_stderr": None, "counted": [],
        "tasks": {"mmlu": found["tasks"]["mmlu"]},
    }  # fmt: skip
    assert primary_metric({"acc": 0.3}) == "acc" and primary_metric(_scores(0.3, norm=0.4)) == "acc_norm"
