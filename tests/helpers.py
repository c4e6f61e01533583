"""Test-only helpers: what tests need from kdistill's pieces that the package itself never calls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdistill.data import alignment
from kdistill.data.alignment import SpanAlignment
from kdistill.data.tokenize import trained_rows
from kdistill.errors import KdistillError
from kdistill.losses import VocabMap
from kdistill.losses.vocab_map import require_fast
from kdistill.objective.batch import LossSettings, StudentLoss
from kdistill.teacher.base import Teacher
from kdistill.teacher.forward import teacher_outputs
from kdistill.teacher.live import LiveTeacher


def as_teachers(teacher: Any) -> list[Teacher]:
    """A bare model (or None) as a one-teacher list, so tests with one live teacher stay short."""
    if teacher is None:
        return []
    return teacher if isinstance(teacher, list) else [LiveTeacher(name="teacher", weight=1.0, model=teacher)]


def batch_loss(
    student: StudentLoss,
    teacher: Any,
    batch: dict[str, Any],
    settings: LossSettings,
    split: str = "train",
    head_grad_scale: float | None = None,
) -> tuple[Any, int]:
    """What one micro-batch of the training step computes: the teachers' outputs, then the student's
    loss sums; and the number of trained tokens."""
    teachers = as_teachers(teacher)
    outputs = None
    if teachers:
        layers = student.teacher_layers() if settings.hidden_weight > 0 else None
        vocab, mode = settings.vocab_size, settings.multi_teacher
        outputs = teacher_outputs(teachers, batch, split, vocab, mode, layers, kd=settings.alpha > 0)
    sums = student(batch, outputs, settings, head_grad_scale=head_grad_scale)
    return sums, int(trained_rows(batch["labels"])[1].numel())


@dataclass(frozen=True)
class Spans(SpanAlignment):
    """`SpanAlignment` with the views tests read: predicting positions, usable segments, selection."""

    @property
    def teacher_pos(self) -> Tensor:
        return self.teacher_start - 1

    @property
    def student_pos(self) -> Tensor:
        return self.student_start - 1

    @property
    def usable(self) -> Tensor:
        return (self.teacher_start > 0) & (self.student_start > 0)

    def select(self, keep: Tensor) -> Spans:
        return Spans(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})

    def within(self, char_start: int, char_end: int | None = None) -> Spans:
        keep = self.char_start >= char_start
        if char_end is not None:
            keep &= self.char_end <= char_end
        return self.select(keep)

    def to_tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> Spans:
        missing = [f.name for f in fields(cls) if f.name not in tensors]
        if missing:
            raise KdistillError(f"stored span alignment lacks {', '.join(missing)}")
        return cls(**{f.name: tensors[f.name].long() for f in fields(cls)})


def spans_of(spans: SpanAlignment) -> Spans:
    return Spans(**{f.name: getattr(spans, f.name) for f in fields(spans)})


def align_offsets(teacher_offsets: Any, student_offsets: Any) -> Spans:
    """`data.alignment.align_offsets`, with the views of `Spans`."""
    return spans_of(alignment.align_offsets(teacher_offsets, student_offsets))


@dataclass(frozen=True)
class AlignedText:
    """One text tokenized by both tokenizers, with its span alignment."""

    teacher_ids: Tensor
    student_ids: Tensor
    spans: Spans

    def to_tensors(self) -> dict[str, Tensor]:
        spans = {f"spans.{k}": v for k, v in self.spans.to_tensors().items()}
        return {"teacher_ids": self.teacher_ids, "student_ids": self.student_ids, **spans}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> AlignedText:
        spans = {k.removeprefix("spans."): v for k, v in tensors.items() if k.startswith("spans.")}
        return cls(tensors["teacher_ids"].long(), tensors["student_ids"].long(), Spans.from_tensors(spans))


def _encode(tokenizer: Any, text: str, add_special_tokens: bool, role: str) -> tuple[list[int], list]:
    require_fast(tokenizer, role, "aligning tokenizers needs character offsets")
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def align_text(
    text: str, teacher_tokenizer: Any, student_tokenizer: Any, add_special_tokens: bool = True
) -> AlignedText:
    """Tokenize ``text`` with both fast tokenizers and align the two token lists."""
    t_ids, t_off = _encode(teacher_tokenizer, text, add_special_tokens, "teacher")
    s_ids, s_off = _encode(student_tokenizer, text, add_special_tokens, "student")
    spans = align_offsets(t_off, s_off)
    return AlignedText(torch.tensor(t_ids, dtype=torch.long), torch.tensor(s_ids, dtype=torch.long), spans)


def stack_positions(alignments: Sequence[Spans]) -> tuple[Tensor, Tensor, Tensor]:
    """Usable compared positions of a batch, flattened: ``(example, teacher_pos, student_pos)``."""
    parts = []
    for index, spans in enumerate(alignments):
        keep = spans.usable
        pos_t, pos_s = spans.teacher_pos[keep], spans.student_pos[keep]
        parts.append((torch.full_like(pos_t, index), pos_t, pos_s))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    example, pos_t, pos_s = (torch.cat(p) for p in zip(*parts))
    return example, pos_t, pos_s


def aligned_share(spans: Spans, teacher_offsets: Sequence[Sequence[int]] | np.ndarray) -> tuple[float, float]:
    """Shares of the teacher's non-special tokens that lie in a segment, and in a one-to-one segment."""
    offsets = np.asarray(teacher_offsets, dtype=np.int64).reshape(-1, 2)
    real = offsets[:, 1] > offsets[:, 0]
    if not real.any():
        return 0.0, 0.0
    covered = np.zeros(len(offsets), dtype=bool)
    exact = np.zeros(len(offsets), dtype=bool)
    for start, end, single in zip(
        spans.teacher_start.tolist(), spans.teacher_end.tolist(), spans.one_to_one.tolist()
    ):
        covered[start:end] = True
        exact[start:end] = single
    return float((covered & real).sum() / real.sum()), float((exact & real).sum() / real.sum())


def mapped_share_of_ids(ids: Tensor, mapping: VocabMap) -> float:
    """Share of the token occurrences in teacher ``ids`` (any shape) that map into the student vocabulary."""
    ids = ids.reshape(-1).long()
    if ids.numel() == 0:
        return 0.0
    return float((mapping.lookup_for(ids)[ids] >= 0).float().mean())
