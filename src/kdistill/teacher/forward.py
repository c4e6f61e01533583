"""The teachers' side of a batch: every teacher's signal, gathered for the objective.

Each teacher gives its signal through one method (`base.Teacher.signal`), whatever its kind. Those
of the student's tokenizer are compared at the trained rows and combined (`losses.ensemble`); a
teacher of another tokenizer is compared at its aligned pairs (`Aligned`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kdistill.errors import KdistillError
from kdistill.losses import DenseHidden, Ensemble, Sparse
from kdistill.teacher.base import Teacher


@dataclass
class Aligned:
    """A teacher of another tokenizer on one batch: its signal at the aligned pairs, and the pairs."""

    teacher: Teacher
    signal: DenseHidden | Sparse  # (N, ...) at the teacher's side of each pair
    example: torch.Tensor  # (N,) batch row of each pair
    student_pos: torch.Tensor  # (N,) the student's position in that row
    one_to_one: torch.Tensor  # (N,) bool


@dataclass
class TeacherOutputs:
    """What the teachers say about one batch, for the objective.

    Attributes:
        signal: the same-tokenizer teachers at the trained rows: one teacher's own signal, or an
            `Ensemble` (also when one such teacher shares the loss with teachers of another tokenizer).
        aligned: each teacher of another tokenizer at its aligned pairs.
        states: per same-tokenizer teacher, its requested layers at the trained rows `(N, Ht)`.
        names, weights: every teacher's name and normalised weight, in the run's order.
    """

    signal: DenseHidden | Sparse | Ensemble | None
    aligned: list[Aligned] = field(default_factory=list)
    states: list[dict[int, torch.Tensor]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def teacher_outputs(
    teachers: list[Teacher],
    batch: dict[str, Any],
    split: str,
    vocab: int | None,
    mode: str = "sum",
    layers: Sequence[Sequence[int]] | None = None,
    kd: bool = True,
) -> TeacherOutputs:
    """Every teacher's output for `batch` (rows of `split`).

    `layers[i]` are the layers wanted from same-tokenizer teacher i (loss.hidden); with `kd` False
    the teachers run for those layers only. `mode` combines several teachers (`losses.ensemble`).
    """
    same = [t for t in teachers if t.mapping is None]
    signal, states = None, []
    if same and (kd or layers):
        said = [t.signal(batch, split, vocab, layers[i] if layers else ()) for i, t in enumerate(same)]
        states = [s.states for s in said]
        if kd:
            weights = tuple(t.weight for t in same)
            values = tuple(s.values for s in said)
            signal = values[0] if len(values) == 1 else Ensemble(values, weights, mode)
    if signal is not None and len(same) < len(teachers) and not isinstance(signal, Ensemble):
        signal = Ensemble((signal,), (same[0].weight,), "sum")  # its share among all the teachers
    aligned = [aligned_teacher(t, batch, split) for t in teachers if t.mapping is not None] if kd else []
    return TeacherOutputs(signal, aligned, states, [t.name for t in teachers], [t.weight for t in teachers])


def aligned_teacher(teacher: Teacher, batch: dict[str, Any], split: str) -> Aligned:
    """A teacher of another tokenizer (`teacher.mapping`) at the batch's aligned pairs."""
    said = teacher.signal(batch, split)
    if said.pairs is None:
        raise KdistillError(f"teacher {teacher.name!r} gave no aligned pairs; it has no vocabulary map")
    example, student_pos, one_to_one = said.pairs
    if said.rows != example.numel():
        raise KdistillError(
            f"teacher {teacher.name!r} gives {said.rows} aligned rows for this batch, the alignment has "
            f"{example.numel()}; rebuild its cache with `kdistill cache`"
        )
    return Aligned(teacher, said.values, example, student_pos, one_to_one)
