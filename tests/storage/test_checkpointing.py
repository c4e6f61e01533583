"""Gradient checkpointing of the student gives the gradients of a plain backward pass, for LoRA,
full and from-teacher students, through the chunked loss, with the single-process savings on."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import batch_loss
from kdistill.config import StudentConfig
from kdistill.models.build import build_student, checkpoint_student
from kdistill.objective.batch import LossSettings, StudentLoss
from kdistill.run.lean import lean_gated_mlps, sparse_tied_embedding

V = 96


def _teacher() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).requires_grad_(False).eval()


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, V, (3, 20))
    labels = ids.clone()
    labels[:, :6] = -100
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    labels[2, 15:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _student(kind: str, teacher: LlamaForCausalLM) -> torch.nn.Module:
    if kind == "lora":
        lora = {"r": 4, "lora_dropout": 0.0}
        cfg = StudentConfig.model_validate(
            {"from_teacher": {"num_layers": 4}, "finetune": "lora", "lora": lora}
        )
        return build_student(cfg, copy.deepcopy(teacher), torch.device("cpu"))
    layers = 4 if kind == "full" else 2
    cfg = StudentConfig.model_validate({"from_teacher": {"num_layers": layers}, "finetune": "full"})
    student = build_student(cfg, teacher, torch.device("cpu"))
    lean_gated_mlps(student)  # the single-process savings stay on under checkpointing
    sparse_tied_embedding(student)
    return student


def _grads(student: torch.nn.Module, teacher: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    student.zero_grad(set_to_none=True)
    settings = LossSettings(alpha=0.6, temperature=2.0, chunk_size=8)
    sums, tokens = batch_loss(StudentLoss(student), teacher, _batch(), settings)
    (sums.total / tokens).backward()
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["lora", "full", "from_teacher"])
def test_checkpointing_gives_the_same_gradients(kind: str) -> None:
    teacher = _teacher()
    student = _student(kind, teacher).train()
    plain = _grads(student, teacher)
    checkpoint_student(student)
    calls = []
    for module in student.modules():
        if getattr(module, "gradient_checkpointing", False):
            inner = module._gradient_checkpointing_func
            module._gradient_checkpointing_func = lambda *a, f=inner, **k: calls.append(1) or f(*a, **k)
    checkpointed = _grads(student, teacher)
    assert len(calls) == student.config.num_hidden_layers  # every layer went through the checkpoint
    assert checkpointed.keys() == plain.keys() and plain
    for name, grad in checkpointed.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-5, msg=name)
