"""Held-out quality of the student: perplexity on the responses and KL to the teacher."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import nn

from kdistill.losses import DEFAULT_CHUNK_SIZE
from kdistill.train.forward import (
    LossSettings,
    Teacher,
    as_teachers,
    batch_loss,
    combined_signal,
    trained_rows,
)


@torch.no_grad()
def held_out_quality(
    student: nn.Module,
    teacher: nn.Module | list[Teacher] | None,
    batches: Iterable[dict[str, torch.Tensor]],
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
    teacher_cache: dict[int, object] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    counted: int | None = None,
    alignment: str = "span",
) -> dict[str, float]:
    """Per-token forward KL(teacher || student) at T = 1, cross-entropy and perplexity.

    Measured at T = 1 whatever the training temperature, so runs with different temperatures
    compare on one scale. `teacher_cache` keeps the teacher's output per batch between calls on the
    same (unshuffled) batches: the teacher does not change, so it runs once per run, not per evaluation.
    Under several processes each passes its share of the batches (`shard_batches`), `reduce` sums
    the KL, CE and token counts over processes, and batches from index `counted` on are run but
    not counted (they only keep the processes in step). With a teacher of another tokenizer, its
    KL is the aligned one (`loss.alignment`), summed over aligned pairs and divided, like the rest,
    by the student's trained tokens.
    """
    was_training = student.training
    student.eval()
    teachers = as_teachers(teacher)
    same = [t for t in teachers if t.mapping is None]
    settings = LossSettings(
        alpha=1.0 if teachers else 0.0,
        temperature=1.0,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
        alignment=alignment,
    )
    kl = ce = 0.0
    tokens = 0
    for index, batch in enumerate(batches):
        signal = None if teacher_cache is None else teacher_cache.get(index)
        if signal is None and same:  # teachers of another tokenizer run inside `batch_loss`
            mask = trained_rows(batch["labels"])[0]
            signal = combined_signal(same, batch, mask, "validation", vocab_size, "sum")
            if teacher_cache is not None:
                teacher_cache[index] = signal
        sums, n = batch_loss(student, teachers, batch, settings, signal=signal, split="validation")
        if counted is None or index < counted:
            kl, ce, tokens = kl + float(sums.kd), ce + float(sums.ce), tokens + n
    student.train(was_training)
    if reduce is not None:
        kl, ce, tokens = reduce(torch.tensor([kl, ce, tokens], dtype=torch.float64)).tolist()
        tokens = int(tokens)
    if tokens == 0:
        return {}
    result = {"ce": ce / tokens, "ppl": math.exp(min(ce / tokens, 50.0)), "tokens": float(tokens)}
    if teachers:
        result["kl"] = kl / tokens
    return result


Batch = TypeVar("Batch")


def shard_batches(batches: list[Batch], rank: int, world: int) -> tuple[list[Batch], int]:
    """This process's share of `batches` (every `world`-th one) and how many of them count.

    Every process gets the same number of batches, the short ones padded with repeats that are run
    but not counted: FSDP gathers the weights in every forward, so all processes must run as many.
    Unlike accelerate's even batches, no row is counted twice.
    """
    mine = batches[rank::world]
    share = -(-len(batches) // world)
    return mine + batches[:1] * (share - len(mine)), len(mine)
