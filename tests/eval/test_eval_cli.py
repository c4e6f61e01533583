"""`kdistill eval` end to end on tiny runs: full and LoRA run folders, a plain model, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_config, write_config
from kdistill.cli import main

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'kdistill[eval]')")

LORA_STUDENT = {
    "from_teacher": None,
    "finetune": "lora",
    "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
}


def trained_run(tmp_path: Path, tiny: dict, steps: int = 2, **sections: dict) -> Path:
    """A finished tiny training run (through the CLI) in `tmp_path/run`; returns its folder."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    sections["training"] = {"max_steps": steps, **sections.get("training", {})}
    config = tiny_config(tiny, tmp_path / "run", **sections)
    assert main(["train", str(write_config(tmp_path / "run.yaml", config)), "--overwrite"]) == 0
    return tmp_path / "run"


def benchmark_dir(folder: Path) -> Path:
    """Tiny benchmark files in the formats of ../shared/data/eval (ARC-Easy and Winogrande)."""
    folder.mkdir(parents=True, exist_ok=True)
    arc = [
        {
            "query": f"Question: which {w} is red?",
            "choices": ["apple", "the sun", "blue car", "a"],
            "gold": i % 4,
        }
        for i, w in enumerate(["book", "car", "city", "dog", "pear"])
    ]
    wino = [
        {"context_options": [f"the cat and the {w}, so the cat", f"the cat and the {w}, so the {w}"],
         "continuation": "was happy.", "gold": i % 2}
        for i, w in enumerate(["dog", "moon", "sun"])
    ]  # fmt: skip
    for name, rows in (("arc_easy", arc), ("winogrande", wino)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _eval(target: Path | str, *args: str) -> int:
    return main(
        ["eval", str(target), "--rouge-rows", "2", "--max-new-tokens", "4", "--batch-size", "4", *args]
    )


def test_eval_run_folder(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture) -> None:
    run = trained_run(tmp_path, tiny)
    data = benchmark_dir(tmp_path / "bench")
    capsys.readouterr()
    assert _eval(run, "--data-dir", str(data), "--tasks", "arc_easy,winogrande", "--limit", "4") == 0
    captured = capsys.readouterr()
    printed = captured.out
    # Every phase's progress bar says what it does, and for which model.
    for phase in ("held-out pass: student and teacher", "generating: student", "generating: teacher"):
        assert phase in captured.err, phase
    result = json.loads((run / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    held = result["held_out"]
    # The same held-out rows, the same loss code: eval agrees with the training run's last evaluation.
    assert held["rows"] == summary["validation_rows"] == 8
    assert held["student"]["ppl"] == pytest.approx(summary["after"]["ppl"], rel=1e-4)
    assert held["student"]["kl"] == pytest.approx(summary["after"]["kl"], rel=1e-4)
    assert 0 <= held["student"]["top1"] <= 1 and 0 <= held["student"]["rouge_l"] <= 1
    assert held["teacher"]["ppl"] > 1 and held["rouge_rows"] == 2
    for who in ("student", "teacher"):  # each model's own answers: length, repetition, the teacher's NLL
        assert held[who]["answer_words"] > 0 and 0 <= held[who]["rep4"] <= 1 and held[who]["teacher_nll"] > 0
    assert set(result["retention"]) == {"margin", "mean", "mean_stderr", "counted", "tasks"}
    assert set(result["retention"]["tasks"]) == {"arc_easy", "winogrande"}
    assert result["kept"]["ppl"] == pytest.approx(held["teacher"]["ppl"] / held["student"]["ppl"])
    arc = result["benchmarks"]["tasks"]["arc_easy"]
    assert arc["student"]["n"] == 4 and {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(
        arc["teacher"]
    )
    assert len(result["generations"]) == 2 and {"prompt", "reference", "student", "teacher"} <= set(
        result["generations"][0]
    )
    assert "ARC-Easy acc (n=4)" in printed and "Winogrande acc (n=3)" in printed and " ± " in printed
    assert (
        "held-out perplexity" in printed
        and "kept" in printed
        and "teacher NLL of the model's answers" in printed
        and f"written to {run / 'eval.json'}" in printed
    )


def test_eval_lora_run_merges_the_adapter(tmp_path: Path, tiny: dict) -> None:
    student = {**LORA_STUDENT, "model": str(tiny["student"])}
    run = trained_run(tmp_path, tiny, steps=2, student=student)
    assert (run / "adapter_config.json").exists() and not (run / "config.json").exists()
    assert _eval(run, "--tasks", "none") == 0
    result = json.loads((run / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert result["held_out"]["student"]["kl"] == pytest.approx(summary["after"]["kl"], rel=1e-4)
    assert "benchmarks" not in result


def test_eval_plain_model_with_teacher_and_file(
    tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    held = tmp_path / "held.jsonl"
    rows = [{"instruction": f"name a {w}", "response": "the sun"} for w in "ab"]
    rows.append({"instruction": "say nothing", "response": "  "})  # left out, as training leaves it out
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.json"
    args = [
        "--teacher",
        str(tiny["teacher"]),
        "--validation",
        str(held),
        "--tasks",
        "none",
        "--output",
        str(out),
    ]
    assert _eval(tiny["student"], *args) == 0
    result = json.loads(out.read_text())
    assert result["held_out"]["rows"] == 2 and result["teacher"] == str(tiny["teacher"])
    assert not (tiny["student"] / "eval.json").exists()  # a plain model folder is not written into


def test_eval_skips_benchmarks_without_data(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = trained_run(tmp_path, tiny, steps=1)
    monkeypatch.delenv("KDISTILL_EVAL_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: lm-eval's own tasks cannot be read either
    assert _eval(run, "--rows", "4") == 0
    assert (
        "no benchmark data: give --data-dir FOLDER or set KDISTILL_EVAL_DATA=FOLDER (files in the formats of "
        "docs/eval.md), or run online to use lm-eval's own tasks; benchmarks skipped" in caplog.text
    )
    result = json.loads((run / "eval.json").read_text())
    assert "benchmarks" not in result and result["held_out"]["rows"] == 4
    # Asked for by name, benchmarks without data are an error that says how to get it.
    assert _eval(run, "--rows", "4", "--tasks", "arc_easy") == 2


def test_eval_reads_benchmark_files_from_the_environment(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = benchmark_dir(tmp_path / "bench")
    monkeypatch.setenv("KDISTILL_EVAL_DATA", str(data))
    out = tmp_path / "eval.json"
    args = ["--teacher", str(tiny["teacher"]), "--tasks", "arc_easy", "--limit", "2", "--output", str(out)]
    assert _eval(tiny["student"], *args) == 0
    result = json.loads(out.read_text())
    assert result["benchmarks"]["data_dir"] == str(data)
    assert result["benchmarks"]["tasks"]["arc_easy"]["student"]["n"] == 2


def test_eval_errors(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "kdistill_config.yaml").write_text(
        json.dumps(tiny_config(tiny, tmp_path / "empty"))  # JSON is YAML
    )
    assert _eval(tmp_path / "empty", "--tasks", "none") == 2
    assert "no trained student in it (neither config.json nor adapter_config.json)" in capsys.readouterr().err
    assert _eval(tiny["student"], "--tasks", "arcc", "--data-dir", str(tmp_path)) == 2
    assert "unknown task(s) ['arcc']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _eval(tiny["student"], "--limit", "0")
    assert "expected a positive number of items or 'all'" in capsys.readouterr().err


def test_teacher_scores_are_reused_from_an_earlier_eval(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from kdistill.eval import runner

    run = trained_run(tmp_path, tiny)
    data = benchmark_dir(tmp_path / "bench")
    common = ("--data-dir", str(data), "--tasks", "arc_easy", "--rows", "4", "--rouge-rows", "1")
    first = tmp_path / "first.json"
    assert _eval(run, *common, "--limit", "4", "--output", str(first)) == 0
    measured = []
    real = runner.run_benchmarks
    monkeypatch.setattr(
        runner, "run_benchmarks", lambda model, *a, **k: measured.append(model) or real(model, *a, **k)
    )
    second = tmp_path / "second.json"
    assert _eval(run, *common, "--limit", "4", "--output", str(second), "--teacher-scores", str(first)) == 0
    assert len(measured) == 1  # the student only
    a, b = (json.loads(p.read_text())["benchmarks"]["tasks"]["arc_easy"] for p in (first, second))
    assert b["teacher"] == a["teacher"] and b["student"]["acc"] == a["student"]["acc"]
    assert (
        json.loads(second.read_text())["retention"]["tasks"]["arc_easy"]["teacher"]
        == a["teacher"]["acc_norm"]
    )
    # The same folder named relative to the working directory is the same benchmark data.
    monkeypatch.chdir(data.parent)
    relative = ("--data-dir", data.name, *common[2:])
    assert _eval(run, *relative, "--limit", "4", "--output", str(second), "--teacher-scores", str(first)) == 0
    assert len(measured) == 2
    capsys.readouterr()
    assert _eval(run, *common, "--limit", "3", "--teacher-scores", str(first)) == 2
    assert f"--teacher-scores {first}: benchmarks.limit is 4 there and 3 here" in capsys.readouterr().err
