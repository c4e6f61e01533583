"""training.max_minutes: a run stops at its wall-clock budget, checkpoints there and resumes with the
minutes left; the cosine schedule decays over the nearer limit. The clock is a fake one that each
optimizer step moves on by a minute."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.run import budget
from kdistill.run.step import Step

MINUTE = 60.0


@pytest.fixture
def minute_steps(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Each optimizer step takes exactly one minute of the fake clock; nothing else takes any time."""
    clock = {"now": 1000.0}
    real_step = Step.__call__

    def one_minute_step(*args, **kwargs):
        clock["now"] += MINUTE
        return real_step(*args, **kwargs)

    monkeypatch.setattr(budget, "now", lambda: clock["now"])
    monkeypatch.setattr(Step, "__call__", one_minute_step)
    return clock


def _train(tmp_path: Path, tiny: dict, minutes: float, *args: str) -> tuple[int, Path]:
    out = tmp_path / "out"
    training = {"max_minutes": minutes, "learning_rate": 1e-3}  # num_epochs 1: 10 steps of 4 rows
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, out, training=training))
    return main(["train", str(config), *args]), out


def _steps(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def test_budget_stops_checkpoints_and_resumes_with_the_minutes_left(
    tmp_path: Path, tiny: dict, minute_steps: dict
) -> None:
    code, out = _train(tmp_path, tiny, 3.5)  # steps end at 1, 2, 3, 4 minutes: 4 >= 3.5 stops
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_seconds"] == 4 * MINUTE
    state = json.loads((out / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["step"] == 4 and state["train_seconds"] == 4 * MINUTE
    # The schedule: cosine over max(steps done / 10, minutes spent / 3.5); time is the nearer limit.
    lrs = [r["lr"] for r in _steps(out)]
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * min(1.0, k / 3.5))) for k in (1, 2, 3, 4)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert lrs[-1] == 0.0

    # More minutes on --resume: an allowed change; 4 spent + 2 more steps reach 6 >= 5.5.
    code, _ = _train(tmp_path, tiny, 5.5, "--resume")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_seconds"] == 6 * MINUTE
    assert [r["step"] for r in _steps(out)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]


def test_resuming_a_spent_budget_runs_no_step(tmp_path: Path, tiny: dict, minute_steps: dict) -> None:
    assert _train(tmp_path, tiny, 2.0)[0] == 0
    code, out = _train(tmp_path, tiny, 2.0, "--resume")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_seconds"] == 2 * MINUTE


def test_a_budget_that_outlasts_the_epochs_stops_at_the_last_step(
    tmp_path: Path, tiny: dict, minute_steps: dict
) -> None:
    code, out = _train(tmp_path, tiny, 100.0)  # 10 steps in 10 minutes: the epoch ends first
    assert code == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 10
    lrs = [r["lr"] for r in _steps(out)]
    assert lrs[0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.1)), rel=1e-6)  # steps nearer
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
