"""The single-process step's memory savings leave the gradients as they were (issue #7).

- the head's gradient goes straight into its `.grad` (`head_grad_scale`), with no second (V, H) buffer;
- a tied input embedding gets a sparse gradient, added into the head's dense one.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import batch_loss
from kdistill.losses import Dense, distill_loss_sums
from kdistill.objective.batch import LossSettings, StudentLoss
from kdistill.run.lean import sparse_tied_embedding

V = 96


def _models() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config), LlamaForCausalLM(config).requires_grad_(False)


def _window() -> list[dict[str, torch.Tensor]]:
    batches = []
    for rows, length in ((3, 20), (2, 12)):
        ids = torch.randint(0, V, (rows, length))
        labels = ids.clone()
        labels[:, : length // 3] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def _grads(student, teacher, window, direct: bool) -> dict[str, torch.Tensor]:
    student.zero_grad(set_to_none=True)
    settings = LossSettings(alpha=0.6, temperature=2.0)
    scale = 1.0 / sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
    for batch in window:
        sums, _ = batch_loss(
            StudentLoss(student), teacher, batch, settings, head_grad_scale=scale if direct else None
        )
        (sums.total * scale).backward()
    return {name: p.grad.clone() for name, p in student.named_parameters()}


def test_direct_head_gradient_and_sparse_embedding_give_the_same_gradients() -> None:
    student, teacher = _models()
    torch.manual_seed(1)
    window = _window()
    reference = _grads(student, teacher, window, direct=False)
    assert sparse_tied_embedding(student)
    assert student.get_input_embeddings().sparse
    saved = _grads(student, teacher, window, direct=True)
    assert saved.keys() == reference.keys()
    for name, grad in saved.items():
        assert grad.layout == torch.strided, name  # dense, as the optimizer and clipping expect
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_an_untied_or_frozen_embedding_stays_dense() -> None:
    student, _ = _models()
    student.get_input_embeddings().requires_grad_(False)
    assert not sparse_tied_embedding(student)
    assert not student.get_input_embeddings().sparse


def test_backward_must_use_the_promised_factor() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(6, 8, requires_grad=True)
    head = torch.nn.Parameter(torch.randn(V, 8))
    labels = torch.randint(0, V, (6,))
    teacher = Dense(torch.randn(6, V))

    def total(scale: float) -> torch.Tensor:
        kw = dict(kd_weight=1.0, ce_weight=0.5, head_grad_scale=scale)
        return distill_loss_sums(hidden, head, labels, teacher, **kw).total

    (total(0.25) * 0.25).backward()
    expected = head.grad.clone()
    head.grad = None
    with pytest.raises(RuntimeError, match="head_grad_scale=0.25 but backward got 0.5"):
        (total(0.25) * 0.5).backward()
    head.grad = None
    (total(0.25) * float("nan")).backward()  # a poisoned loss poisons the head's gradient too
    assert torch.isnan(head.grad).all()
    head.grad = None
    plain = distill_loss_sums(hidden, head, labels, teacher, kd_weight=1.0, ce_weight=0.5).total
    (plain * 0.25).backward()
    torch.testing.assert_close(head.grad, expected, rtol=1e-6, atol=1e-7)


def test_lean_gated_mlps_give_the_same_gradients_with_fewer_saved_tensors() -> None:
    import copy

    from kdistill.run.lean import lean_gated_mlps

    student, _ = _models()
    lean = copy.deepcopy(student)
    assert lean_gated_mlps(lean) == 2
    ids = torch.randint(0, V, (2, 16))
    saved = {}
    for name, model in (("plain", student), ("lean", lean)):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, s=sizes: s.append(t.numel()) or t, lambda t: t
        ):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        saved[name] = sum(sizes)
    for (name, a), b in zip(student.named_parameters(), lean.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    # Per layer, the SiLU output and the product (2 x 32 tokens x 64) are no longer kept.
    assert saved["plain"] - saved["lean"] >= 2 * 2 * 32 * 64
    with torch.no_grad():  # without autograd the module's own forward runs
        torch.testing.assert_close(lean(input_ids=ids).logits, student(input_ids=ids).logits)


def test_lean_student_applies_both_savings_in_one_process() -> None:
    from kdistill.run.lean import lean_student

    student, _ = _models()
    lean_student(student, Accelerator(cpu=True))
    assert student.get_input_embeddings().sparse
    assert all(layer.mlp.forward.__func__.__name__ == "_forward" for layer in student.model.layers)
