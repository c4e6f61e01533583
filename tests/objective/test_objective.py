"""The objective on real (tiny) models: response rows only, token normalisation, accumulation."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import batch_loss
from kdistill.data import IGNORE_INDEX, Collator, Tokenized
from kdistill.data.formats import Example
from kdistill.data.tokenize import tokenize_examples
from kdistill.objective.batch import LossSettings, StudentLoss


def _batch(tiny: dict[str, Path]) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(tiny["teacher"])
    examples = [
        Example([{"role": "user", "content": "name three fruits"}], "apple pear and the red car"),
        Example([{"role": "user", "content": "the sun"}], "moon"),
    ]
    items, _ = tokenize_examples(examples, tok, 64)
    return Collator(tok.pad_token_id)(items)


def _reference(student, teacher, batch, alpha: float, temperature: float) -> tuple[torch.Tensor, int]:
    """The guide's loss written the plain way, on full logits, restricted to trained tokens."""
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    s, t, y = s[mask], t[mask], labels[mask]
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="sum",
    )
    ce = F.cross_entropy(s, y, reduction="sum")
    n = int(mask.sum())
    return (alpha * temperature**2 * kl + (1 - alpha) * ce) / n, n


def test_batch_loss_matches_full_logit_reference(tiny: dict[str, Path]) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny["student"])
    batch = _batch(tiny)
    expected, n = _reference(student, teacher, batch, alpha=0.3, temperature=2.5)
    expected.backward()
    want = {k: p.grad.clone() for k, p in student.named_parameters()}
    student.zero_grad()
    sums, count = batch_loss(
        StudentLoss(student), teacher, batch, LossSettings(alpha=0.3, temperature=2.5, chunk_size=7)
    )
    (sums.total / count).backward()
    assert count == n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(sums.total / count, expected.detach(), rtol=1e-5, atol=1e-6)
    for name, param in student.named_parameters():
        torch.testing.assert_close(param.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_plain_fine_tuning_is_cross_entropy(tiny: dict[str, Path]) -> None:
    student = AutoModelForCausalLM.from_pretrained(tiny["student"])
    batch = _batch(tiny)
    sums, n = batch_loss(StudentLoss(student), None, batch, LossSettings(alpha=0.0, temperature=1.0))
    hf = student(**batch).loss  # transformers' own mean CE over the same labels
    torch.testing.assert_close(sums.total / n, hf.detach(), rtol=1e-5, atol=1e-6)


def test_padding_does_not_change_the_loss(tiny: dict[str, Path]) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny["student"])
    batch = _batch(tiny)
    settings = LossSettings(alpha=0.5, temperature=2.0)
    row = {k: v[1:] for k, v in batch.items()}
    n1 = int(row["attention_mask"].sum())
    trimmed = {k: v[:, :n1] for k, v in row.items()}
    padded, _ = batch_loss(StudentLoss(student), teacher, row, settings)
    alone, _ = batch_loss(StudentLoss(student), teacher, trimmed, settings)
    torch.testing.assert_close(padded.total, alone.total, rtol=1e-5, atol=1e-5)


def test_tokenized_rows_have_no_label_at_position_zero_that_counts() -> None:
    batch = Collator(0)([Tokenized([5, 6, 7], [5, 6, 7])])
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 2


def test_held_out_quality_reuses_the_teacher_output(tiny: dict[str, Path]) -> None:
    from helpers import as_teachers
    from kdistill.objective.quality import held_out_quality

    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    student = StudentLoss(AutoModelForCausalLM.from_pretrained(tiny["student"]))
    batches = [_batch(tiny), _batch(tiny)]
    cache: dict = {}
    calls = {"n": 0}
    hook = teacher.model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    first = held_out_quality(student, as_teachers(teacher), batches, chunk_size=5, memo=cache)
    assert sorted(cache) == [0, 1] and calls["n"] == 2
    calls["n"] = 0
    second = held_out_quality(student, as_teachers(teacher), batches, chunk_size=5, memo=cache)
    hook.remove()
    assert calls["n"] == 0 and second == first
    plain = held_out_quality(student, as_teachers(teacher), batches, chunk_size=None)
    assert abs(plain["kl"] - first["kl"]) < 1e-5 and abs(plain["ppl"] - first["ppl"]) < 1e-3 * first["ppl"]
