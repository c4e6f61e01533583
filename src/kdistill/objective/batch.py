"""One batch to loss sums: the student, wrapped with its hidden-state projections, whose forward is
the batch's loss.

Logits are never computed for the whole sequence: the student stops at its final hidden states,
only the rows that train (response tokens) are kept, and the loss projects those through the
output head chunk by chunk (`losses.chunked`). In a padded instruction batch most positions are
prompt or padding, so this alone removes most of the head's work.

The loss runs inside the wrapped module's forward because FSDP and ZeRO-3 gather a sharded module's
weights only during its forward: read outside it, the head would be this process's shard. For the
same reason the hidden-state projections are a submodule here: accelerate prepares them with the
student, DDP averages their gradients and the optimizer steps them with the student's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.data import trained_rows
from kdistill.losses import DEFAULT_CHUNK_SIZE, HiddenProjections, LossSums, aligned_kd_sum, distill_loss_sums
from kdistill.losses.hidden import hidden_loss_sums
from kdistill.models.parts import base_model, output_head, softcap
from kdistill.teacher.forward import TeacherOutputs


@dataclass(frozen=True)
class LossSettings:
    """Plain values the loss needs; built from the config once, by `objective.settings.loss_settings`."""

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
    ce: bool = True  # False on a batch the student wrote itself: no gold label, the divergence alone


@dataclass
class StepSums(LossSums):
    """`LossSums` with the hidden-state term, which `total` already includes (times its weight)."""

    hidden: torch.Tensor | None = None  # detached: sum over teachers of weight x hidden sums over rows
    hidden_parts: torch.Tensor | None = None  # (P,) detached: each teacher's own hidden sum


class StudentLoss(nn.Module):
    """The student and its hidden-state projections (one `HiddenProjections` per teacher, in the
    teachers' order, with loss.hidden); `forward(batch, teachers, settings)` is the batch's loss sums."""

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

    def teacher_layers(self) -> list[list[int]]:
        """Per teacher, the layers its projections compare with (what the teachers must return)."""
        return [[t for t, _ in p.pairs] for p in self.projections]

    def forward(
        self,
        batch: dict[str, Any],
        teachers: TeacherOutputs | None,
        settings: LossSettings,
        head_grad_scale: float | None = None,
    ) -> LossSums:
        """KD and CE sums over the batch's trained tokens (a `StepSums` with loss.hidden).

        `teachers` are the teachers' outputs for this batch (`teacher.forward.teacher_outputs`), None
        without teachers. `head_grad_scale`: the factor the caller back-propagates the total with, in a
        single process (the head's gradient then goes straight into its `.grad`; see `distill_loss_sums`).
        """
        mask, targets = trained_rows(batch["labels"])
        hidden = settings.hidden_weight > 0
        if hidden and (
            teachers is None or not len(self.projections) == len(teachers.states) == len(teachers.names)
        ):
            raise ValueError("the hidden-state loss needs one projection per live same-tokenizer teacher")
        layers = sorted({s for p in self.projections for _, s in p.pairs}) if hidden else None
        decoder = base_model(self.model).get_decoder()
        extra = {"output_hidden_states": layers} if layers else {}
        out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
        final = out.last_hidden_state
        use_teacher = teachers is not None and bool(teachers.names) and settings.alpha > 0
        signal = teachers.signal if use_teacher else None
        weight, bias = output_head(self.model, settings.vocab_size)
        sums = distill_loss_sums(
            final[:, :-1][mask],
            weight,
            targets,
            signal,
            # Only teachers of another tokenizer (no same-vocabulary signal): their KD is added below.
            kd_weight=settings.alpha * settings.temperature**2 if signal is not None else 0.0,
            ce_weight=(1.0 - settings.alpha if use_teacher else 1.0) if settings.ce else 0.0,
            temperature=settings.temperature,
            divergence=settings.divergence,
            divergence_kwargs=settings.divergence_kwargs,
            chunk_size=settings.chunk_size,
            student_bias=bias,
            student_softcap=softcap(self.model),
            head_grad_scale=head_grad_scale,
        )
        if use_teacher and teachers.aligned:
            sums = self._with_aligned(sums, final, teachers, settings)
        return self._with_hidden(sums, out.hidden_states, mask, teachers, settings) if hidden else sums

    def _with_aligned(
        self, sums: LossSums, final: torch.Tensor, teachers: TeacherOutputs, settings: LossSettings
    ) -> LossSums:
        """`sums` plus each teacher of another tokenizer's KD on its aligned pairs (weighted, summed)."""
        weight, bias = output_head(self.model, settings.vocab_size)
        kd_scale = settings.alpha * settings.temperature**2
        total, kd = sums.total, sums.kd
        own = [n for n in teachers.names if n not in {a.teacher.name for a in teachers.aligned}]
        parts = dict(zip(own, list(sums.kd_parts) if sums.kd_parts is not None else [sums.kd]))
        for a in teachers.aligned:
            part = aligned_kd_sum(
                final[a.example, a.student_pos],
                weight,
                a.signal,
                a.one_to_one,
                a.teacher.mapping,
                method=settings.alignment,
                temperature=settings.temperature,
                divergence=settings.divergence,
                divergence_kwargs=settings.divergence_kwargs,
                student_bias=bias,
                student_softcap=softcap(self.model),
            )
            total = total + kd_scale * a.teacher.weight * part
            kd = kd + a.teacher.weight * part.detach()
            parts[a.teacher.name] = part.detach()
        names = teachers.names
        kd_parts = torch.stack([parts[n].reshape(()) for n in names]) if len(names) > 1 else None
        return LossSums(total=total, kd=kd, ce=sums.ce, kd_parts=kd_parts)

    def _with_hidden(
        self,
        sums: LossSums,
        states: Sequence[torch.Tensor | None],
        mask: torch.Tensor,
        teachers: TeacherOutputs,
        settings: LossSettings,
    ) -> StepSums:
        """`sums` plus `hidden_weight` times the teacher-weighted sum of each teacher's hidden sums."""
        # The mask marks trained rows among the first T - 1 positions; states cover all T: pad with False.
        rows = F.pad(mask, (0, 1), value=False)
        # The teachers' states are already those rows, (N, Ht), in the same order: take every one.
        every = torch.ones(int(mask.sum()), dtype=torch.bool, device=rows.device)
        hidden, parts = torch.zeros((), device=rows.device), []
        for projections, teacher, weight in zip(
            self.projections, teachers.states, teachers.weights, strict=True
        ):
            one = hidden_loss_sums(
                states, teacher, rows, projections, settings.hidden_distance, teacher_mask=every
            )
            hidden = hidden + weight * one.total
            parts.append(one.total.detach())
        total = sums.total + settings.hidden_weight * hidden
        return StepSums(total, sums.kd, sums.ce, sums.kd_parts, hidden.detach(), torch.stack(parts))
