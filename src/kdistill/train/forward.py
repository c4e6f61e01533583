"""One batch through student and teacher, down to the loss sums.

Logits are never computed for the whole sequence: both models stop at their final hidden states,
only the rows that train (response tokens) are kept, and the loss projects those through the
output head chunk by chunk. In a padded instruction batch most positions are prompt or padding,
so this alone removes most of the head's work.

With `loss.hidden` on, the same two forward passes also give the paired intermediate layers: the
teacher's under inference mode, the student's inside `StudentHidden.forward`, where the hidden-state
loss is computed too, so that its projections train, sync and shard with the student.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.losses import DEFAULT_CHUNK_SIZE, LossSums, distill_loss_sums
from kdistill.losses.aligned import aligned_kd_sum
from kdistill.losses.hidden import HiddenProjections, hidden_loss_sums
from kdistill.teacher.signal import DenseHidden, Ensemble, Sparse
from kdistill.train.teacher_pass import (  # noqa: F401  (re-exported: callers import them from here)
    Aligned,
    Teacher,
    _base,
    aligned_teacher,
    as_teachers,
    combined_signal,
    live_teacher,
    output_head,
    softcap,
    teacher_hidden,
    teacher_outputs,
    teacher_signal,
    trained_rows,
)


@dataclass(frozen=True)
class LossSettings:
    """Plain values the loss needs; built from the config once, by `kdistill.train.loop`."""

    alpha: float
    temperature: float
    divergence: str = "forward_kl"
    divergence_kwargs: dict | None = None
    chunk_size: int | None = DEFAULT_CHUNK_SIZE
    vocab_size: int | None = None  # common logit width when the two heads are padded differently
    multi_teacher: str = "sum"  # how several teachers combine: sum | mixture (see losses.ensemble)
    hidden_weight: float = 0.0  # loss.hidden.weight; 0: no hidden-state term and no layers kept
    hidden_distance: str = "mse"  # mse | cosine
    alignment: str = "span"  # teachers of another tokenizer: span (mapped KL + ULD fallback) | uld


@dataclass
class StepSums(LossSums):
    """`LossSums` with the hidden-state term, which `total` already includes (times its weight)."""

    hidden: torch.Tensor | None = None  # detached: sum over teachers of weight x hidden sums over rows
    hidden_parts: torch.Tensor | None = None  # (P,) detached: each teacher's own hidden sum


@dataclass
class HiddenTargets:
    """The teachers' paired layers at the trained rows, for the student's forward to compare with."""

    mask: torch.Tensor  # (B, T-1) bool: the trained rows
    states: list[dict[int, torch.Tensor]]  # per teacher: teacher layer -> its states there, (N, Ht)
    weights: list[float]  # per teacher: its normalised weight
    distance: str


class StudentHidden(nn.Module):
    """Wraps the student so its forward returns final hidden states, not logits.

    Going through one module's forward keeps DDP/FSDP wrappers in charge of gradient sync. For the
    same reason the hidden-state projections (one `HiddenProjections` per teacher, in the teachers'
    order) are a submodule here and are applied inside `forward`: accelerate prepares them with the
    student, DDP averages their gradients and the optimizer steps them with the student's weights.
    """

    def __init__(self, model: nn.Module, projections: Sequence[HiddenProjections] = ()) -> None:
        super().__init__()
        self.model = model
        self.projections = nn.ModuleList(projections)

    def tie_weights(self) -> None:
        """Re-tie the student's output head to its embeddings (tied models such as SmolLM2).

        accelerate re-ties only the module it prepares, which is this wrapper: FSDP's memory-saving
        load would otherwise leave the head untied from the embeddings.
        """
        self.model.tie_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        hidden: HiddenTargets | None = None,
        head_loss: Callable[[torch.Tensor, nn.Module], Any] | None = None,
    ) -> Any:
        """Final hidden states `(B, T, H)`, or `head_loss(states, model)` of them when given.

        The loss on the output head runs here, inside the wrapped forward, because FSDP and ZeRO-3
        gather a sharded module's weights only during its forward: read outside, the head would be
        this process's shard. With `hidden`, returns `(result, hidden sums)` (see `_hidden_sums`).
        """
        decoder = _base(self.model).get_decoder()
        if hidden is None:
            final = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return final if head_loss is None else head_loss(final, self.model)
        layers = sorted({s for p in self.projections for _, s in p.pairs})
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=layers)
        final = out.last_hidden_state
        result = final if head_loss is None else head_loss(final, self.model)
        return result, self._hidden_sums(out.hidden_states, hidden)

    def _hidden_sums(
        self, states: Sequence[torch.Tensor | None], hidden: HiddenTargets
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(total, parts)`: the teacher-weighted sum of each teacher's hidden sums, and those `(P,)`."""
        # The mask marks trained rows among the first T - 1 positions; states cover all T: pad with False.
        rows = F.pad(hidden.mask, (0, 1), value=False)
        # The teachers' states are already those rows, (N, Ht), in the same order: take every one.
        every = torch.ones(int(hidden.mask.sum()), dtype=torch.bool, device=rows.device)
        total, parts = torch.zeros((), device=rows.device), []
        for projections, teacher, weight in zip(self.projections, hidden.states, hidden.weights, strict=True):
            sums = hidden_loss_sums(states, teacher, rows, projections, hidden.distance, teacher_mask=every)
            total = total + weight * sums.total
            parts.append(sums.total.detach())
        return total, torch.stack(parts)


def batch_loss(
    student: nn.Module,
    teacher: nn.Module | list[Teacher] | None,
    batch: dict[str, Any],
    settings: LossSettings,
    signal: DenseHidden | Sparse | Ensemble | None = None,
    split: str = "train",
    head_grad_scale: float | None = None,
) -> tuple[LossSums, int]:
    """Loss sums over the batch's trained tokens, and how many tokens that is.

    `signal` is the same-tokenizer teachers' output for this batch when the caller already has it
    (evaluation reuses it across passes); otherwise live teachers run and cached ones are read (rows
    of `split`). Teachers of another tokenizer always run (or are read) here, at their aligned pairs.
    With `settings.hidden_weight > 0` the result is a `StepSums` whose `total` holds
    `hidden_weight * hidden` too; `student` is then a `StudentHidden` with one projection per teacher.
    `head_grad_scale`: the factor the caller back-propagates the total with, in a single process (the
    head's gradient then goes straight into its `.grad`; see `distill_loss_sums`).
    """
    mask, targets = trained_rows(batch["labels"])
    wrapper = student.module if hasattr(student, "module") else student
    teachers = as_teachers(teacher)
    same = [t for t in teachers if t.mapping is None]
    use_teacher = bool(teachers) and settings.alpha > 0
    use_hidden = settings.hidden_weight > 0
    if use_hidden and (
        signal is not None or len(wrapper.projections) != len(teachers) or len(same) < len(teachers)
    ):
        raise ValueError(
            "the hidden-state loss needs one projection per live same-tokenizer teacher, no given signal"
        )
    states: list[dict[int, torch.Tensor]] = []
    if signal is None and same and (use_teacher or use_hidden):
        layers = [[t for t, _ in p.pairs] for p in wrapper.projections] if use_hidden else None
        vocab, mode = settings.vocab_size, settings.multi_teacher
        signal, states = teacher_outputs(same, batch, mask, split, vocab, mode, layers)
        signal = signal if use_teacher else None  # alpha = 0: the teachers ran for their layers only
    if signal is not None and len(same) < len(teachers) and not isinstance(signal, Ensemble):
        signal = Ensemble((signal,), (same[0].weight,), "sum")  # its share among all the teachers
    aligned = (
        [aligned_teacher(t, batch, split) for t in teachers if t.mapping is not None] if use_teacher else []
    )
    head_loss = partial(
        _head_sums, mask=mask, targets=targets, signal=signal, aligned=aligned, settings=settings
    )
    head_loss = partial(
        head_loss, use_teacher=use_teacher, order=[t.name for t in teachers], head_grad_scale=head_grad_scale
    )
    if not use_hidden:
        return student(batch["input_ids"], batch["attention_mask"], head_loss=head_loss), int(targets.numel())
    targets_h = HiddenTargets(mask, states, [t.weight for t in teachers], settings.hidden_distance)
    sums, (hidden, parts) = student(batch["input_ids"], batch["attention_mask"], targets_h, head_loss)
    total = sums.total + settings.hidden_weight * hidden
    return StepSums(total, sums.kd, sums.ce, sums.kd_parts, hidden.detach(), parts), int(targets.numel())


def _head_sums(
    final: torch.Tensor,
    inner: nn.Module,
    *,
    mask: torch.Tensor,
    targets: torch.Tensor,
    signal: DenseHidden | Sparse | Ensemble | None,
    aligned: list[Aligned],
    settings: LossSettings,
    use_teacher: bool,
    order: list[str],
    head_grad_scale: float | None = None,
) -> LossSums:
    """KD and CE sums from the student's final states `(B, T, H)`: same-tokenizer teachers on the
    trained rows, then each teacher of another tokenizer on its aligned pairs (weighted, summed)."""
    rows = final[:, :-1][mask]
    sums = _logit_sums(rows, inner, targets, signal, use_teacher, settings, head_grad_scale)
    if not aligned:
        return sums
    weight, bias = output_head(inner, settings.vocab_size)
    kd_scale = settings.alpha * settings.temperature**2
    total, kd = sums.total, sums.kd
    parts = dict(zip([n for n in order if n not in {a.teacher.name for a in aligned}], _parts(sums)))
    for a in aligned:
        part = aligned_kd_sum(
            final[a.example, a.student_pos],
            weight,
            a.signal,
            a.one_to_one,
            a.teacher.mapping,
            method=settings.alignment,
            temperature=settings.temperature,
            divergence=settings.divergence,
            student_bias=bias,
            student_softcap=softcap(inner),
        )
        total = total + kd_scale * a.teacher.weight * part
        kd = kd + a.teacher.weight * part.detach()
        parts[a.teacher.name] = part.detach()
    kd_parts = torch.stack([parts[n].reshape(()) for n in order]) if len(order) > 1 else None
    return LossSums(total=total, kd=kd, ce=sums.ce, kd_parts=kd_parts)


def _parts(sums: LossSums) -> list[torch.Tensor]:
    if sums.kd_parts is not None:
        return list(sums.kd_parts)
    return [sums.kd]


def _logit_sums(
    rows: torch.Tensor,
    inner: nn.Module,
    targets: torch.Tensor,
    signal: DenseHidden | Sparse | Ensemble | None,
    use_teacher: bool,
    settings: LossSettings,
    head_grad_scale: float | None = None,
) -> LossSums:
    """KD and CE sums from the student's final hidden states at the trained rows `(N, H)`."""
    weight, bias = output_head(inner, settings.vocab_size)
    return distill_loss_sums(
        rows,
        weight,
        targets,
        signal,
        # Only teachers of another tokenizer (no same-vocabulary signal): their KD is added by the caller.
        kd_weight=settings.alpha * settings.temperature**2 if use_teacher and signal is not None else 0.0,
        ce_weight=1.0 - settings.alpha if use_teacher else 1.0,
        temperature=settings.temperature,
        divergence=settings.divergence,
        divergence_kwargs=settings.divergence_kwargs,
        chunk_size=settings.chunk_size,
        student_bias=bias,
        student_softcap=softcap(inner),
        head_grad_scale=head_grad_scale,
    )
