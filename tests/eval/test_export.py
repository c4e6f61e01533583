"""`kdistill export --gguf` on tiny run folders (full and LoRA) and on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_eval_cli import LORA_STUDENT, trained_run
from transformers import AutoModelForCausalLM

from kdistill.cli import main
from kdistill.config import load_config
from kdistill.eval.load import load_run_student
from kdistill.models.parts import default_device

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'kdistill[gguf]')")


def _same_logits(run: Path, path: Path, teacher=None) -> float:
    cfg = load_config(run / "kdistill_config.yaml")
    ours = load_run_student(run, cfg, teacher, default_device()).float().eval()
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (ours(ids).logits - back.eval()(ids).logits).abs().max().item()


def test_export_a_full_run(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture) -> None:
    run = trained_run(tmp_path, tiny)
    assert main(["export", str(run), "--gguf"]) == 0
    path = run / "student-f32.gguf"
    assert f"GGUF (f32) written to {path}" in capsys.readouterr().out
    assert _same_logits(run, path) <= 1e-4


def test_export_a_lora_run_merged(tmp_path: Path, tiny: dict) -> None:
    student = {**LORA_STUDENT, "model": str(tiny["student"])}
    run = trained_run(tmp_path, tiny, student=student)
    assert not (run / "config.json").exists()
    out = tmp_path / "elsewhere" / "student.gguf"
    assert main(["export", str(run), "--gguf", "--type", "q8_0", "--output", str(out)]) == 0
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    assert "lora" not in " ".join(n for n, _ in back.named_parameters())  # merged into plain weights
    assert _same_logits(run, out) < 0.05


def test_export_refuses_what_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(tmp_path / "nothing"), "--gguf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a run folder" in err and "nor a model folder" in err
