"""Both on-policy losses against float64 references: the pure policy-gradient formula, and each mode
through the chunked head on a tiny model's generated batch, gradients included."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import batch_loss
from kdistill.data import Collator
from kdistill.data.tokenize import trained_rows
from kdistill.losses.divergences import reverse_kl
from kdistill.losses.policy import sampled_reverse_kl
from kdistill.objective.batch import LossSettings, StudentLoss
from kdistill.sampling.generate import Sampling, generated_window


def test_sampled_reverse_kl_matches_a_float64_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 11, generator=gen, dtype=torch.float64)
    t = torch.randn(7, 11, generator=gen, dtype=torch.float64)
    x = torch.randint(0, 11, (7,), generator=gen)
    temperature = 1.5
    # Reference: value sum_t k_t, gradient sum_t k_t * d log q(x_t) / dz = k_t (onehot - softmax) / T.
    log_q = torch.log_softmax(z / temperature, -1)
    k = log_q[range(7), x] - torch.log_softmax(t / temperature, -1)[range(7), x]
    grad = k[:, None] * (torch.nn.functional.one_hot(x, 11) - log_q.exp()) / temperature
    student = z.float().requires_grad_(True)
    value = sampled_reverse_kl(student, t.float(), labels=x, temperature=temperature)
    value.backward()
    torch.testing.assert_close(value.double(), k.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student.grad.double(), grad, rtol=1e-4, atol=1e-6)


def test_sampled_gradient_is_the_reverse_kl_gradient_in_expectation() -> None:
    """Summed over every token x, weighted by q(x), the policy gradient is grad KL(q || p) exactly."""
    gen = torch.Generator().manual_seed(1)
    z, t = torch.randn(1, 9, generator=gen), torch.randn(1, 9, generator=gen)
    q = torch.softmax(z, -1)[0]
    expected = torch.zeros_like(z)
    for x in range(9):
        student = z.clone().requires_grad_(True)
        sampled_reverse_kl(student, t, labels=torch.tensor([x])).backward()
        expected += q[x] * student.grad
    student = z.clone().requires_grad_(True)
    reverse_kl(student, t).backward()
    torch.testing.assert_close(expected, student.grad, rtol=1e-5, atol=1e-6)


def _generated(tiny: dict[str, Path], student) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(tiny["teacher"])
    prompts = [tok("name three fruits")["input_ids"], tok("the sun is")["input_ids"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]  # generation reads the prompt as the tokens before the first label
    batch = {"input_ids": ids, "attention_mask": (ids != tok.pad_token_id).long(), "labels": labels}
    sampling = Sampling(1.0, 10, 1.0, 1.0, 32, tok.eos_token_id, tok.pad_token_id, 8)
    window, sums = generated_window(student, [batch], sampling, Collator(tok.pad_token_id), seed=3)
    assert sums["gen_rows"] == 2 and sums["gen_tokens"] > 2
    return window[0]


def _reference(student, teacher, batch, mode: str, alpha: float, temperature: float) -> torch.Tensor:
    """The loss written the plain way in float64, on full logits at the generated tokens."""
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    mask, y = trained_rows(batch["labels"])
    log_q = torch.log_softmax(s64(**inputs).logits[:, :-1][mask] / temperature, -1)
    with torch.no_grad():
        log_p = torch.log_softmax(t64(**inputs).logits[:, :-1][mask] / temperature, -1)
    if mode == "divergence":  # reverse KL at every generated position, no CE
        kd = (log_q.exp() * (log_q - log_p)).sum()
    else:
        lq, lp = log_q[range(len(y)), y], log_p[range(len(y)), y]
        k = (lq - lp).detach()
        kd = (k + k * (lq - lq.detach())).sum()
    return alpha * temperature**2 * kd, s64


@pytest.mark.parametrize("mode", ["divergence", "sampled"])
def test_each_mode_matches_float64_on_a_tiny_model(tiny: dict[str, Path], mode: str) -> None:
    student = AutoModelForCausalLM.from_pretrained(tiny["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    batch = _generated(tiny, student)
    alpha, temperature = 0.7, 1.3
    settings = LossSettings(alpha, temperature, divergence="reverse_kl", chunk_size=3, ce=False)
    if mode == "sampled":
        settings = replace(settings, divergence="sampled_reverse_kl")
    sums, _ = batch_loss(StudentLoss(student), teacher, batch, settings)
    sums.total.backward()
    reference, s64 = _reference(student, teacher, batch, mode, alpha, temperature)
    reference.backward()
    torch.testing.assert_close(sums.total.double(), reference.detach(), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(student.named_parameters(), s64.parameters()):
        if q.grad is not None and q.grad.abs().max() > 0:
            torch.testing.assert_close(p.grad.double(), q.grad, rtol=2e-3, atol=2e-5, msg=name)
