"""`kdistill prune` on the tiny teacher: the folder, its records, and in-process pruning for `train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.config import RunConfig, load_config
from kdistill.errors import KdistillError
from kdistill.models.build import build_student, load_teacher
from kdistill.models.prune import build_shape, count_params
from kdistill.models.prune.calibration import load_calibration

CPU = torch.device("cpu")
PRUNED = {"method": "importance", "num_layers": 3, "intermediate_size": 64, "num_key_value_heads": 1}


def pruned_config(tiny: dict[str, Path], tmp_path: Path, **keys: object) -> Path:
    student = {"from_teacher": {**PRUNED, "calibration_rows": 12, **keys}, "finetune": "full"}
    return write_config(tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "run", student=student))


def test_prune_command_writes_a_loadable_folder(tiny: dict[str, Path], tmp_path: Path, capsys) -> None:
    config = pruned_config(tiny, tmp_path, hidden_size=48, depth_score="removal_kl")
    out = tmp_path / "pruned"
    assert main(["prune", str(config), "--output", str(out), "--eval-rows", "6"]) == 0
    printed = capsys.readouterr().out
    assert "3 layers, hidden 48, MLP 64, 2 heads / 1 key-value groups" in printed
    summary = json.loads((out / "prune.json").read_text())
    scores = json.loads((out / "importance.json").read_text())
    assert len(scores["scores"]["layers"]["removal"]) == 4 and len(scores["kept"]["layers"]) == 3
    assert summary["held_out_before_training"]["kl"] > 0 and (out / "layers.png").stat().st_size > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == summary["params"]["total"]
    cfg = load_config(str(config))
    shape = build_shape(
        AutoModelForCausalLM.from_pretrained(tiny["teacher"]).config, cfg.student.from_teacher
    )
    assert count_params(model.config, shape)[0] == summary["params"]["total"]  # known from config.json alone
    AutoTokenizer.from_pretrained(out)
    # the folder trains as an ordinary student.model
    student = build_student(RunConfig.model_validate({**tiny_config(tiny, tmp_path), "student": {
        "model": str(out), "finetune": "full"}}).student, None, CPU)  # fmt: skip
    assert student.config.num_hidden_layers == 3
    assert main(["prune", str(config), "--output", str(out)]) == 2  # refuses a non-empty folder


def test_train_prunes_in_process_as_prune_does(tiny: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(str(pruned_config(tiny, tmp_path)))
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    calibration = load_calibration(cfg, tokenizer)
    assert sum(len(b["input_ids"]) for b in calibration) == 12
    teacher = load_teacher(cfg.teacher, CPU)
    student = build_student(cfg.student, teacher, CPU, calibration)
    again = build_student(cfg.student, teacher, CPU, load_calibration(cfg, tokenizer))
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), again.parameters()))  # deterministic
    assert student.config.intermediate_size == 64 and all(p.requires_grad for p in student.parameters())


def test_validate_knows_the_pruned_shape_and_refuses_lora(
    tiny: dict[str, Path], tmp_path: Path, capsys
) -> None:
    config = pruned_config(tiny, tmp_path, params=0.5, intermediate_size=None, hidden_size=32)
    assert main(["validate", str(config), "--memory"]) == 0
    printed = capsys.readouterr().out
    assert "pruned by importance" in printed and "parameters (" in printed and "non-embedding" in printed
    bad = pruned_config(tiny, tmp_path, num_layers=9)
    assert main(["validate", str(bad)]) == 2
    assert "num_layers=9: the teacher has 4" in capsys.readouterr().err
    lora = write_config(tmp_path / "lora.yaml", {**tiny_config(tiny, tmp_path / "r"), "student": {
        "from_teacher": PRUNED, "finetune": "lora"}})  # fmt: skip
    assert main(["validate", str(lora)]) == 2
    assert "run `kdistill prune CONFIG` once" in capsys.readouterr().err


def test_prune_needs_from_teacher(tiny: dict[str, Path], tmp_path: Path) -> None:
    from kdistill.models.pruned_folder import write_pruned

    cfg = RunConfig.model_validate(
        {**tiny_config(tiny, tmp_path), "student": {"model": str(tiny["student"])}}
    )
    with pytest.raises(KdistillError, match="give student.from_teacher"):
        write_pruned(cfg, tmp_path / "x")


def test_kdistill_train_with_an_importance_student(tiny: dict[str, Path], tmp_path: Path) -> None:
    config = pruned_config(tiny, tmp_path, hidden_size=48)
    assert main(["train", str(config), "--set", "training.max_steps=2"]) == 0
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert (trained.config.num_hidden_layers, trained.config.hidden_size) == (3, 48)
    assert trained.config.intermediate_size == 64 and trained.config.head_dim == 16
