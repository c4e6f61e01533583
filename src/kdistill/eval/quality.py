"""Held-out quality of the student: perplexity on the responses and KL to the teacher."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from kdistill.losses import DEFAULT_CHUNK_SIZE
from kdistill.train.forward import LossSettings, batch_loss, teacher_signal, trained_rows


@torch.no_grad()
def held_out_quality(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable[dict[str, torch.Tensor]],
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
    teacher_cache: dict[int, object] | None = None,
) -> dict[str, float]:
    """Per-token forward KL(teacher || student) at T = 1, cross-entropy and perplexity.

    Measured at T = 1 whatever the training temperature, so runs with different temperatures
    compare on one scale. `teacher_cache` keeps the teacher's output per batch between calls on the
    same (unshuffled) batches: the teacher does not change, so it runs once per run, not per evaluation.
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
    for index, batch in enumerate(batches):
        signal = None if teacher_cache is None else teacher_cache.get(index)
        if signal is None and teacher is not None:
            signal = teacher_signal(teacher, batch, trained_rows(batch["labels"])[0], vocab_size)
            if teacher_cache is not None:
                teacher_cache[index] = signal
        sums, n = batch_loss(student, teacher, batch, settings, signal=signal)
        kl, ce, tokens = kl + float(sums.kd), ce + float(sums.ce), tokens + n
    student.train(was_training)
    if tokens == 0:
        return {}
    result = {"ce": ce / tokens, "ppl": math.exp(min(ce / tokens, 50.0)), "tokens": float(tokens)}
    if teacher is not None:
        result["kl"] = kl / tokens
    return result
