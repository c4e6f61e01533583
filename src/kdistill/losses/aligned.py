"""The KD term for a teacher with another tokenizer, on aligned positions, chunk by chunk.

Rows are pairs of positions that predict the same text (`data.cross`). Where the aligned segment
is one token on each side, the two next-token distributions are compared through the vocabulary
map with an explicit "other" bucket (`cross_vocab.mapped_divergence`). Where it is not (a teacher
token covering two student tokens, or the reverse), the next tokens themselves differ, so no token
map is meaningful and Universal Logit Distillation's sorted-probability distance is used instead
(`cross_vocab.uld_distance`). ``method="uld"`` uses ULD everywhere.

Like the same-vocabulary chunked loss, the student's logits exist one chunk at a time: each chunk is
recomputed in backward (activation checkpointing) rather than kept, since a (rows, V) fp32 block
per chunk is what dominates memory with a 262k-token teacher.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdistill.losses.cross_vocab import mapped_divergence, uld_distance
from kdistill.losses.vocab_map import VocabMap
from kdistill.teacher.signal import DenseHidden, Sparse, softcap_logits

ALIGNMENT_METHODS = ("span", "uld")


def _select(teacher: Tensor | Sparse, keep: Tensor) -> Tensor | Sparse:
    if isinstance(teacher, Tensor):
        return teacher[keep]
    tail = None if teacher.tail is None else teacher.tail[keep]
    return replace(teacher, ids=teacher.ids[keep], logprobs=teacher.logprobs[keep], tail=tail)


def _chunk_sum(
    student_logits: Tensor,
    teacher: Tensor | Sparse,
    one_to_one: Tensor,
    mapping: VocabMap,
    method: str,
    temperature: float,
    divergence: str,
) -> Tensor:
    """Mapped divergence on the one-to-one rows plus ULD on the others, summed over the chunk."""
    mapped = one_to_one if method == "span" else torch.zeros_like(one_to_one)
    total = student_logits.new_zeros(())
    if bool(mapped.any()):
        total = total + mapped_divergence(
            student_logits[mapped],
            _select(teacher, mapped),
            mapping,
            divergence=divergence,
            temperature=temperature,
        )
    rest = ~mapped
    if bool(rest.any()):
        total = total + uld_distance(
            student_logits[rest],
            _select(teacher, rest),
            temperature=temperature,
            teacher_vocab_size=mapping.teacher_size,
        )
    return total


def aligned_kd_sum(
    student_rows: Tensor,
    student_head: Tensor,
    teacher: DenseHidden | Sparse,
    one_to_one: Tensor,
    mapping: VocabMap,
    *,
    method: str = "span",
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    chunk_size: int = 128,
    student_bias: Tensor | None = None,
    student_softcap: float | None = None,
) -> Tensor:
    """KD between a student and a teacher of another vocabulary, summed over N aligned rows.

    Args:
        student_rows: ``(N, Hs)`` student final hidden states at the aligned student positions.
        student_head: ``(Vs, Hs)`` student output head.
        teacher: the teacher at the aligned teacher positions, row i paired with student row i:
            ``DenseHidden`` (a live teacher, ``(N, Ht)`` with its head) or ``Sparse`` (a cache).
        one_to_one: ``(N,)`` bool, the aligned segment is one token on each side.
        mapping: teacher ids to student ids.
    Returns:
        A scalar: the sum over rows (no ``T**2``; the objective scales and normalises once).
    """

    def chunk(rows: Tensor, start: int, end: int) -> Tensor:
        logits = softcap_logits(F.linear(rows, student_head, student_bias).float(), student_softcap)
        return _chunk_sum(
            logits, teacher.rows(start, end), one_to_one[start:end], mapping, method, temperature, divergence
        )

    total = student_rows.new_zeros((), dtype=torch.float32)
    for start in range(0, student_rows.shape[0], chunk_size):
        end = min(start + chunk_size, student_rows.shape[0])
        rows = student_rows[start:end]
        if rows.requires_grad:
            total = total + checkpoint(chunk, rows, start, end, use_reentrant=False)
        else:
            total = total + chunk(rows, start, end)
    return total
