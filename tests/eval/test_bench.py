"""`kdistill bench` end to end on tiny runs: each model measured in its own process, with ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_eval_cli import LORA_STUDENT, trained_run
from transformers import AutoModelForCausalLM

from kdistill.cli import main

FAST = ["--prompt-tokens", "16", "--new-tokens", "4", "--repeats", "1"]


def _parameters(folder: Path) -> int:
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())


def test_bench_run_folder(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture) -> None:
    run = trained_run(tmp_path, tiny, steps=1)
    capsys.readouterr()
    assert main(["bench", str(run), *FAST]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run / "bench.json").read_text())
    teacher, student = result["teacher"], result["student"]
    assert teacher["parameters"] == _parameters(tiny["teacher"]) and student["parameters"] == _parameters(run)
    assert student["parameters"] < teacher["parameters"]  # 2 of the teacher's 4 layers
    # The student was trained in fp32 and is written in fp32: the same bytes as the run's own file.
    assert student["disk_bytes"] == pytest.approx((run / "model.safetensors").stat().st_size, rel=0.01)
    for role in (teacher, student):
        assert role["peak_memory_bytes"] > 50 * 2**20  # a whole Python process with torch in it
        assert role["prompt_tok_s"] > 0 and role["generate_tok_s"] > 0 and role["dtype"] == "float32"
    for key, ratio in result["ratios"].items():
        assert ratio == pytest.approx(student[key] / teacher[key])
    assert result["settings"] == {"prompt_tokens": 16, "new_tokens": 4, "batch_size": 1, "repeats": 1}
    assert result["machine"]["cpu_count"] >= 1
    for label in (
        "parameters",
        "size on disk",
        "peak memory (max RSS)",
        "prompt tokens/s",
        "generation tokens/s",
    ):
        assert label in printed
    assert "student / teacher" in printed and f"written to {run / 'bench.json'}" in printed


def test_bench_lora_run_measures_the_merged_student(tmp_path: Path, tiny: dict) -> None:
    run = trained_run(tmp_path, tiny, steps=1, student={**LORA_STUDENT, "model": str(tiny["student"])})
    assert main(["bench", str(run), *FAST]) == 0
    result = json.loads((run / "bench.json").read_text())
    assert result["student"]["parameters"] == _parameters(tiny["student"])  # merged: no adapter weights


def test_bench_failure_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    assert main(["bench", str(tmp_path / "broken"), *FAST]) == 2
    err = capsys.readouterr().err  # the measuring process's own message, relayed in one line
    assert err.startswith(f"kdistill: error: bench: the student {tmp_path / 'broken'}: model ")
    assert err.count("\n") == 1
    assert "Should have a `model_type` key in its config.json" in err and "Traceback" not in err
