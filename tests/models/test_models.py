"""Teacher loading, the from_teacher student, LoRA, vocabulary checks and model errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SHARED_DATA
from kdistill.config import StudentConfig, TeacherConfig
from kdistill.errors import KdistillError
from kdistill.models.build import build_student, load_teacher
from kdistill.models.even_cut import keep_indices, shrink
from kdistill.models.loading import resolve
from kdistill.teacher.vocabularies import shared_vocab_size

CPU = torch.device("cpu")


def test_teacher_is_frozen_in_eval_mode(tiny: dict[str, Path]) -> None:
    teacher = load_teacher(TeacherConfig(model=str(tiny["teacher"])), CPU)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert next(teacher.parameters()).dtype == torch.float32  # auto on CPU


@pytest.mark.parametrize(
    ("total", "keep", "expected"),
    [
        (30, 10, [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]),
        (4, 2, [0, 3]),
        (5, 3, [0, 2, 4]),
        (4, 4, [0, 1, 2, 3]),
    ],
)
def test_keep_indices_spread_evenly_with_first_and_last(total: int, keep: int, expected: list[int]) -> None:
    assert keep_indices(total, keep) == expected


def test_shrink_copies_the_kept_layers(tiny: dict[str, Path]) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    student = shrink(teacher, 2)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for new, old in enumerate([0, 3]):
        for (name, p), (_, q) in zip(
            student.model.layers[new].named_parameters(), teacher.model.layers[old].named_parameters()
        ):
            assert torch.equal(p, q), name
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    same = shrink(teacher, 4)  # keeping every layer reproduces the teacher exactly
    ids = torch.randint(0, 100, (2, 12))
    torch.testing.assert_close(same(ids).logits, teacher(ids).logits)


def test_shrink_errors(tiny: dict[str, Path]) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    with pytest.raises(KdistillError, match="num_layers=9: the teacher has 4 layers"):
        shrink(teacher, 9)
    with pytest.raises(KdistillError, match="cannot shrink Linear"):
        shrink_target = torch.nn.Linear(2, 2)
        shrink_target.config = teacher.config
        shrink(shrink_target, 2)


def test_lora_student_trains_only_adapters(tiny: dict[str, Path]) -> None:
    student = build_student(StudentConfig(model=str(tiny["student"]), finetune="lora"), None, CPU)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= adapted
    assert not any("lm_head" in n for n in trainable)


def test_full_student_from_teacher(tiny: dict[str, Path]) -> None:
    teacher = load_teacher(TeacherConfig(model=str(tiny["teacher"])), CPU)
    cfg = StudentConfig(from_teacher={"num_layers": 3}, finetune="full")
    student = build_student(cfg, teacher, CPU)
    assert student.config.num_hidden_layers == 3 and all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())  # the copy did not unfreeze the teacher


def test_missing_models(tmp_path: Path) -> None:
    with pytest.raises(KdistillError, match="model folder not found: ./no/such/model"):
        resolve("./no/such/model")
    with pytest.raises(KdistillError, match="Python package 'no_such_pkg_kd' is not installed"):
        resolve("package:no_such_pkg_kd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdistillError, match="has neither config.json nor a .gguf file"):
        resolve(str(tmp_path / "empty"))


def test_shared_vocabulary_uses_the_common_width(tiny: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(tiny["teacher"])
    assert shared_vocab_size("t", tok, len(tok) + 64, "s", tok, len(tok)) == len(tok)


@pytest.mark.skipif(not (SHARED_DATA / "tokenizers").is_dir(), reason="../shared/data/tokenizers is absent")
def test_different_real_tokenizers_are_named_with_their_sizes() -> None:
    mistral = AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "mistral-v1")
    gpt2 = AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "gpt2")
    with pytest.raises(KdistillError) as info:
        shared_vocab_size("mistral-v1", mistral, 32000, "gpt2", gpt2, 50257)
    message = str(info.value)
    assert "teacher 'mistral-v1' has a 32,000-token vocabulary, student 'gpt2' a 50,257-token one" in message
    assert "loss.alignment" in message
