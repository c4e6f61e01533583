"""The report's charts, drawn with matplotlib into PNG bytes: loss curves and retention bars."""

from __future__ import annotations

import io
import math
from typing import Any

from kdistill.eval.tables import TASK_LABELS

_CURVE_LABELS = {
    "loss": "total",
    "loss/kd": "KD divergence (before the T² weight)",
    "loss/ce": "cross-entropy",
    "loss/hidden": "hidden-state loss",
    "eval/kl": "KL to teacher",
    "eval/ce": "cross-entropy",
}


def line_plot(records: list[dict[str, Any]], keys: list[str], title: str, ylabel: str) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.6), dpi=110, layout="constrained")
    axes = figure.add_subplot()
    for key in keys:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        label = _CURVE_LABELS.get(key, key)
        axes.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=label)
    axes.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    return _png(figure)


def retention_bars(tasks: dict[str, dict[str, Any]]) -> bytes | None:
    """One small bar chart per benchmark: teacher and student accuracy with ±1 standard error, chance as
    a dashed line and the share retained above chance in the title; None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    columns = min(3, len(tasks))
    lines = math.ceil(len(tasks) / columns)
    figure = Figure(figsize=(3.0 * columns, 2.6 * lines), dpi=110, layout="constrained")
    for index, (task, row) in enumerate(tasks.items()):
        axes = figure.add_subplot(lines, columns, index + 1)
        values = [row["teacher"] or 0.0, row["student"] or 0.0]
        errors = [row["teacher_stderr"] or 0.0, row["student_stderr"] or 0.0]
        axes.bar(["teacher", "student"], values, yerr=errors, capsize=4, color=["#4c72b0", "#dd8452"])
        axes.axhline(row["chance"], color="grey", linestyle="--", linewidth=1)
        kept = "teacher near chance" if row["kept"] is None else f"{row['kept']:.0%} kept"
        axes.set_title(f"{TASK_LABELS.get(task, task)}: {kept}", fontsize=9)
        axes.set_ylim(0, 1)
        axes.set_ylabel(row["metric"], fontsize=8)
        axes.tick_params(labelsize=8)
    return _png(figure)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
