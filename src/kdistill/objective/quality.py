"""Held-out quality of the student: perplexity on the responses and KL to the teacher."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from kdistill.data import trained_rows
from kdistill.losses import DEFAULT_CHUNK_SIZE
from kdistill.objective.batch import LossSettings, StudentLoss
from kdistill.teacher.base import Teacher
from kdistill.teacher.forward import TeacherOutputs, teacher_outputs

# exp(50) ~ 5e21: an untrained student's cross-entropy can overflow exp; no perplexity is reported above.
_MAX_CE = 50.0


def perplexity(ce: float) -> float:
    """`exp(ce)` of a per-token cross-entropy, capped at e^50."""
    return math.exp(min(ce, _MAX_CE))


@torch.no_grad()
def held_out_quality(
    student: StudentLoss,
    teachers: list[Teacher],
    batches: Iterable[dict[str, torch.Tensor]],
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
    memo: dict[int, TeacherOutputs] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    counted: int | None = None,
    alignment: str = "span",
    progress: str | None = None,
) -> dict[str, float]:
    """Per-token forward KL(teacher || student) at T = 1, cross-entropy and perplexity.

    Measured at T = 1 whatever the training temperature, so runs with different temperatures
    compare on one scale. `memo` keeps the teachers' outputs per batch between calls on the same
    (unshuffled) batches: the teachers do not change, so they run once per run, not per evaluation.
    Under several processes each passes its share of the batches (`shard_batches`), `reduce` sums
    the KL, CE and token counts over processes, and batches from index `counted` on are run but
    not counted (they only keep the processes in step). With a teacher of another tokenizer, its
    KL is the aligned one (`loss.alignment`), summed over aligned pairs and divided, like the rest,
    by the student's trained tokens. `progress` names a progress bar over the batches.
    """
    was_training = student.training
    student.eval()
    settings = LossSettings(
        alpha=1.0 if teachers else 0.0,
        temperature=1.0,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
        alignment=alignment,
    )
    kl = ce = 0.0
    tokens = 0
    for index, batch in enumerate(tqdm(batches, desc=progress, unit="batch", disable=progress is None)):
        outputs = None if memo is None else memo.get(index)
        if outputs is None and teachers:
            outputs = teacher_outputs(teachers, batch, "validation", vocab_size)
            if memo is not None:
                memo[index] = outputs
        sums = student(batch, outputs, settings)
        if counted is None or index < counted:
            n = int(trained_rows(batch["labels"])[0].sum())
            kl, ce, tokens = kl + float(sums.kd), ce + float(sums.ce), tokens + n
    student.train(was_training)
    if reduce is not None:
        kl, ce, tokens = reduce(torch.tensor([kl, ce, tokens], dtype=torch.float64)).tolist()
        tokens = int(tokens)
    if tokens == 0:
        return {}
    result = {"ce": ce / tokens, "ppl": perplexity(ce / tokens), "tokens": float(tokens)}
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
