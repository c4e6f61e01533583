"""Divergences between a teacher and a student whose vocabularies differ, on aligned positions.

Two ways to compare next-token distributions over different vocabularies:
- ``mapped_divergence``: project the teacher onto the student's vocabulary through a ``VocabMap``
  (tokens whose strings match), with the mass of unmapped tokens in one explicit "other" bucket on
  each side, then apply any divergence of ``registry.LOSSES``.
- ``uld_distance``: Universal Logit Distillation (Boizard et al. 2024), which needs no map at all.

Rows are aligned positions (`data.alignment`): student row i and teacher row i both predict the
text that starts the same aligned segment. Every function returns a sum over the N rows (the
objective normalises once) and does not apply ``T**2``.

``aligned_kd_sum`` is the KD term of a teacher with another tokenizer as training computes it.
Where the aligned segment is one token on each side, the two next-token distributions are compared
through the vocabulary map (``mapped_divergence``). Where it is not (a teacher token covering two
student tokens, or the reverse), the next tokens themselves differ, so no token map is meaningful
and ULD is used instead; ``method="uld"`` uses ULD everywhere. Like the same-vocabulary chunked
loss, the student's logits exist one chunk at a time: each chunk is recomputed in backward
(activation checkpointing) rather than kept, since a (rows, V) fp32 block per chunk is what
dominates memory with a 262k-token teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdistill.losses.registry import check_loss
from kdistill.losses.signal import DenseHidden, Sparse, log1mexp, softcap_logits
from kdistill.losses.vocab_map import VocabMap


def _other_mass(log_probs: Tensor, exclude: Tensor) -> Tensor:
    """``(N, 1)`` log of the mass of ``log_probs`` ``(N, V)`` outside ``exclude`` ``(N, k)`` ids.

    Index ``V`` in ``exclude`` means "nothing" (a padding column absorbs it). A logsumexp over the
    rest, not ``log(1 - kept)``, which would cancel catastrophically when the kept mass is near 1.
    """
    padded = torch.cat([log_probs, log_probs[:, :1]], dim=-1)
    rest = padded.scatter(-1, exclude, torch.finfo(log_probs.dtype).min)[:, :-1]
    return torch.logsumexp(rest, dim=-1, keepdim=True)


def _group_logsumexp(log_probs: Tensor, column: Tensor, width: int) -> Tensor:
    """``(N, width)`` log of the summed probabilities of ``log_probs`` ``(N, k)`` landing in each ``column``.

    ``column`` is ``(N, k)`` in ``[0, width)``. Several teacher tokens can decode to one student token
    ("▁" and "<0x20>" both to " "), so their masses add up; done in log space around each group's
    maximum, so a lone member comes back exactly and small probabilities do not underflow.
    """
    floor = torch.finfo(log_probs.dtype).min
    top = log_probs.new_full((log_probs.shape[0], width), floor).scatter_reduce(1, column, log_probs, "amax")
    total = torch.zeros_like(top).scatter_add(1, column, (log_probs - top.gather(1, column)).exp())
    return top + total.log()


def _project_dense(student: Tensor, teacher: Tensor, mapping: VocabMap) -> tuple[Tensor, Tensor]:
    """Both sides over the mapped student ids (the map's image, ``M'``) plus one "other" bucket.

    Each "other" is ``log(1 - mapped mass)``, from the mapped columns only: with a 262k-token teacher
    a gather of the unmapped columns would cost more than the rest of the loss.
    """
    t_ids, image, column = mapping.dense_plan(teacher.shape[-1], teacher.device)
    n = teacher.shape[0]
    t_mapped = teacher.index_select(1, t_ids)
    t_img = _group_logsumexp(t_mapped, column.expand(n, -1), image.numel())
    s_img = student.index_select(1, image)
    return torch.cat([s_img, _rest(s_img)], -1), torch.cat([t_img, _rest(t_mapped)], -1)


def _rest(log_probs: Tensor) -> Tensor:
    """``(N, 1)`` log of the mass outside the ``(N, M)`` log-probs' columns, ``log(1 - sum p)``.

    Stable through ``log1mexp``; rounding can put the kept mass a hair above 1, which is clamped to
    leave the most negative float (nothing outside) rather than NaN.
    """
    kept = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=-1e-7)
    return log1mexp(kept).clamp(min=torch.finfo(log_probs.dtype).min)


def _project_sparse(
    student: Tensor, teacher: Sparse, mapping: VocabMap, temperature: float
) -> tuple[Tensor, Tensor]:
    """Both sides over the student ids of the row's mapped top-k plus one "other" bucket, ``(N, k + 1)``.

    The teacher's "other" holds its tail and its unmapped top-k mass. Slots are sorted by student
    id, so top-k tokens sharing a student id sit together: the first of each run holds the run's
    summed mass; the rest, and unmapped slots, hold nothing on either side. Everything is
    ``(N, k)``-sized except the student's "other" (one masked copy of its ``(N, Vs)`` log-probs).
    """
    vs, floor = student.shape[-1], torch.finfo(student.dtype).min
    t_lp = teacher.bucket_log_probs(mapping.teacher_size, temperature)
    s_ids = mapping.lookup_for(teacher.ids)[teacher.ids.long()]
    col, order = torch.where(s_ids >= 0, s_ids, vs).sort(dim=-1, stable=True)  # vs: unmapped, sorted last
    t_top = t_lp[:, :-1].gather(1, order)
    starts = torch.ones_like(col, dtype=torch.bool)
    starts[:, 1:] = col[:, 1:] != col[:, :-1]
    keep = starts & (col < vs)
    run = starts.long().cumsum(-1) - 1  # index of each slot's run of equal student ids
    t_runs = _group_logsumexp(t_top, run, col.shape[-1])
    t_slots = torch.where(keep, t_runs.gather(1, run), floor)
    t_unmapped = t_top.masked_fill(col < vs, float("-inf"))
    t_other = torch.logsumexp(torch.cat([t_unmapped, t_lp[:, -1:]], -1), dim=-1, keepdim=True)
    s_slots = torch.where(keep, student.gather(1, col.clamp(max=vs - 1)), floor)
    s_other = _other_mass(student, torch.where(keep, col, vs))
    return torch.cat([s_slots, s_other], -1), torch.cat([t_slots, t_other], -1)


def mapped_log_probs(
    student_logits: Tensor, teacher: Tensor | Sparse, mapping: VocabMap, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs at temperature T over shared outcomes: mapped tokens + "other".

    The teacher's distribution is projected onto the student's vocabulary through ``mapping``; the
    teacher's mass on unmapped tokens and the student's mass on tokens no teacher token maps to each
    go to one explicit "other" bucket (the last column), so both sides are proper distributions.

    Args:
        student_logits: ``(N, Vs)`` student logits at the aligned student positions.
        teacher: ``(N, Vt)`` teacher logits, or a ``Sparse`` top-k signal, at the aligned teacher positions.
        mapping: the vocabulary map, teacher ids to student ids.
    Returns:
        ``(student, teacher)`` log-probs, ``(N, M' + 1)`` for a dense teacher (``M'`` distinct mapped
        student ids), ``(N, k + 1)`` for a sparse one; empty outcomes hold the most negative float.
    """
    scaled = student_logits.float() if temperature == 1.0 else student_logits.float() / temperature
    student = torch.log_softmax(scaled, dim=-1)
    if isinstance(teacher, Sparse):
        return _project_sparse(student, teacher, mapping, temperature)
    scaled = teacher.float() if temperature == 1.0 else teacher.float() / temperature
    return _project_dense(student, torch.log_softmax(scaled, dim=-1), mapping)


def mapped_divergence(
    student_logits: Tensor,
    teacher: Tensor | Sparse,
    mapping: VocabMap,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    **params: float,
) -> Tensor:
    """A registered divergence (forward KL by default) on the mapped outcomes, summed over the N rows.

    Shapes as in ``mapped_log_probs``; returns a scalar. ``T**2`` is not applied (the objective does).
    """
    loss, params = check_loss(divergence, params)
    student, target = mapped_log_probs(student_logits, teacher, mapping, temperature)
    # The divergences take logits; normalised log-probs are logits whose softmax is themselves.
    return loss.fn(student, target, temperature=1.0, **params)


def uld_distance(
    student_logits: Tensor,
    teacher: Tensor | Sparse,
    *,
    temperature: float = 1.0,
    teacher_vocab_size: int | None = None,
) -> Tensor:
    """Universal Logit Distillation (Boizard et al. 2024): L1 between sorted probabilities, summed over rows.

    Both distributions at temperature T are sorted in decreasing order and the shorter padded with
    zeros; ranks past the shorter vocabulary then add the longer side's remaining mass. Needs no
    vocabulary map. A ``Sparse`` teacher knows only its top k: ranks ``k+1..`` are one bucket on each
    side (the teacher's tail against the student's mass below its own top k), exact when k covers
    the vocabulary and, at T = 1, otherwise a lower bound of the full distance.

    Args:
        student_logits: ``(N, Vs)`` student logits.
        teacher: ``(N, Vt)`` teacher logits, or ``Sparse`` (then ``teacher_vocab_size`` = ``Vt`` is
            required: it says whether the top k is the whole vocabulary).
    Returns: a scalar, the distance summed over the N rows.
    """
    student = torch.softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, Sparse):
        if teacher_vocab_size is None:
            raise ValueError("uld_distance needs teacher_vocab_size with a Sparse teacher")
        lp = teacher.bucket_log_probs(teacher_vocab_size, temperature).exp()
        top, tail = lp[:, :-1].sort(dim=-1, descending=True).values, lp[:, -1]
    else:
        top = torch.softmax(teacher.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
        tail = top.new_zeros(top.shape[0])
    n = min(top.shape[-1], student.shape[-1])
    s_top, s_ids = student.topk(n, dim=-1)
    s_rest = student.scatter(-1, s_ids, 0.0).sum(-1)
    return (top[:, :n] - s_top).abs().sum() + top[:, n:].sum() + (tail - s_rest).abs().sum()


def _select(teacher: Tensor | Sparse, keep: Tensor) -> Tensor | Sparse:
    return teacher[keep] if isinstance(teacher, Tensor) else teacher.select(keep)


def _chunk_sum(
    student_logits: Tensor,
    teacher: Tensor | Sparse,
    one_to_one: Tensor,
    mapping: VocabMap,
    method: str,
    temperature: float,
    divergence: str,
    divergence_kwargs: dict[str, float],
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
            **divergence_kwargs,
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
    divergence_kwargs: dict[str, float] | None = None,
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
        divergence, divergence_kwargs: the registered divergence on the mapped rows, and its parameters.
    Returns:
        A scalar: the sum over rows (no ``T**2``; the objective scales and normalises once).
    """

    def chunk(rows: Tensor, start: int, end: int) -> Tensor:
        logits = softcap_logits(F.linear(rows, student_head, student_bias).float(), student_softcap)
        return _chunk_sum(
            logits, teacher.rows(start, end), one_to_one[start:end], mapping, method, temperature, divergence,
            params,
        )  # fmt: skip

    params = dict(divergence_kwargs or {})

    total = student_rows.new_zeros((), dtype=torch.float32)
    for start in range(0, student_rows.shape[0], chunk_size):
        end = min(start + chunk_size, student_rows.shape[0])
        rows = student_rows[start:end]
        if rows.requires_grad:
            total = total + checkpoint(chunk, rows, start, end, use_reentrant=False)
        else:
            total = total + chunk(rows, start, end)
    return total
