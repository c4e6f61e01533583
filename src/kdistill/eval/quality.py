"""Held-out quality of the student: perplexity on the responses and KL to the teacher."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from kdistill.train.forward import LossSettings, batch_loss


@torch.no_grad()
def held_out_quality(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable[dict[str, torch.Tensor]],
    chunk_size: int | None = 1024,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Per-token forward KL(teacher || student) at T = 1, cross-entropy and perplexity.

    Measured at T = 1 whatever the training temperature, so runs with different temperatures
    compare on one scale.
    """
    was_training = student.training
    student.eval()
    settings = LossSettings(
        alpha=1.0 if teacher is not None else 0.0,
        temperature=1.0,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
    )
    kl = ce = 0.0
    tokens = 0
    for batch in batches:
        sums, n = batch_loss(student, teacher, batch, settings)
        kl, ce, tokens = kl + float(sums.kd), ce + float(sums.ce), tokens + n
    student.train(was_training)
    if tokens == 0:
        return {}
    result = {"ce": ce / tokens, "ppl": math.exp(min(ce / tokens, 50.0)), "tokens": float(tokens)}
    if teacher is not None:
        result["kl"] = kl / tokens
    return result
