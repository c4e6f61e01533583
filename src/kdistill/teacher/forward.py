"""The teachers' side of a batch: live forward passes, cache reads, and aligned teachers.

A live teacher runs under inference mode and stops at its final hidden states at the rows that
train; its head is applied later, chunk by chunk, by the loss. A cached teacher is read from disk.
A teacher of another tokenizer reads its own tokens (`data.alignment`) and is compared at aligned
pairs. `teacher_outputs` gathers all of it for one batch, for the objective to consume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdistill.data import trained_rows
from kdistill.errors import KdistillError
from kdistill.losses import DenseHidden, Ensemble, Sparse
from kdistill.losses.hidden import require_live_teacher
from kdistill.models.parts import base_model, output_head, softcap
from kdistill.teacher.roster import Teacher


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


@torch.inference_mode()
def teacher_hidden(
    teacher: nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor, layers: Sequence[int] = ()
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The teacher's final hidden states `(N, H)` at the trained rows and those of `layers`; no autograd.

    `layers` are numbered as `output_hidden_states` numbers them (0 = embeddings). One forward pass
    gives both: the decoder keeps only the listed layers (transformers leaves the others None; a
    version that does not select keeps them all, and the listed ones are still read by index).
    """
    extra = {"output_hidden_states": sorted(set(layers))} if layers else {}
    out = base_model(teacher).get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra
    )
    states = {t: out.hidden_states[t][:, :-1][mask] for t in set(layers)}
    return out.last_hidden_state[:, :-1][mask], states


def live_teacher(
    teacher: nn.Module,
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor,
    vocab: int | None,
    layers: Sequence[int] = (),
) -> tuple[DenseHidden, dict[int, torch.Tensor]]:
    """A live teacher's signal at the trained rows (hidden states with its head; logits come later, by
    chunk), and the states `(N, H)` of its `layers` from the same forward pass."""
    hidden, states = teacher_hidden(teacher, batch, mask, layers)
    # Cloning outside inference mode turns the rows into ordinary tensors the loss may save for backward.
    weight, bias = output_head(teacher, vocab)
    signal = DenseHidden(hidden=hidden.clone(), head=weight, bias=bias, softcap=softcap(teacher))
    return signal, {t: s.clone() for t, s in states.items()}


def teacher_outputs(
    teachers: list[Teacher],
    batch: dict[str, Any],
    split: str,
    vocab: int | None,
    mode: str = "sum",
    layers: Sequence[Sequence[int]] | None = None,
    kd: bool = True,
) -> TeacherOutputs:
    """Every teacher's output for `batch`: live ones run, cached ones are read (rows of `split`).

    `layers[i]` are the layers wanted from same-tokenizer teacher i (loss.hidden); with `kd` False
    the teachers run for those layers only. `mode` combines several teachers (`losses.ensemble`).
    """
    mask = trained_rows(batch["labels"])[0]
    same = [t for t in teachers if t.mapping is None]
    signal, states = None, []
    if same and (kd or layers):
        signals = []
        for i, teacher in enumerate(same):
            one, layer_states = _one_teacher(teacher, batch, mask, split, vocab, layers[i] if layers else ())
            signals.append(one)
            states.append(layer_states)
        if kd:
            weights = tuple(t.weight for t in same)
            signal = signals[0] if len(signals) == 1 else Ensemble(tuple(signals), weights, mode)
    if signal is not None and len(same) < len(teachers) and not isinstance(signal, Ensemble):
        signal = Ensemble((signal,), (same[0].weight,), "sum")  # its share among all the teachers
    aligned = [aligned_teacher(t, batch, split) for t in teachers if t.mapping is not None] if kd else []
    return TeacherOutputs(signal, aligned, states, [t.name for t in teachers], [t.weight for t in teachers])


def _one_teacher(
    teacher: Teacher, batch: dict[str, Any], mask: torch.Tensor, split: str, vocab: int | None, layers
) -> tuple[DenseHidden | Sparse, dict[int, torch.Tensor]]:
    """One same-tokenizer teacher's signal at the trained rows, and its `layers` (cached or served: none)."""
    if teacher.cache is None and teacher.server is None:
        return live_teacher(teacher.model, batch, mask, vocab, layers)
    if layers:  # setup refuses this first; kept so that no caller gets a silent zero loss
        where = str(teacher.cache.folder) if teacher.cache is not None else ", ".join(teacher.server.urls)
        require_live_teacher(True, where, teacher.name)
    if teacher.server is not None:
        return teacher.server.signal(batch), {}
    if "row" not in batch:
        raise KdistillError("a cached teacher needs each batch's dataset row indices (batch['row'])")
    signal = teacher.cache.signal(split, batch["row"].cpu()).to(mask.device)
    if signal.ids.shape[0] != int(mask.sum()):
        raise KdistillError(
            f"teacher cache {teacher.cache.folder} holds {signal.ids.shape[0]} tokens for this "
            f"batch, the batch trains {int(mask.sum())}; rebuild it with `kdistill cache`"
        )
    return signal, {}


def aligned_teacher(teacher: Teacher, batch: dict[str, Any], split: str) -> Aligned:
    """Run (or read) a teacher of another tokenizer at the batch's aligned pairs."""
    device = batch["input_ids"].device
    if teacher.cache is not None:
        signal = teacher.cache.signal(split, batch["row"].cpu()).to(device)
        example, student_pos, one_to_one = (
            t.to(device) for t in teacher.cache.alignment(split, batch["row"].cpu())
        )
    else:
        prefix = f"teacher/{teacher.name}/"
        view = {k.removeprefix(prefix): v for k, v in batch.items() if k.startswith(prefix)}
        if not view:
            raise KdistillError(
                f"teacher {teacher.name!r} has another tokenizer but the batch holds no view of it"
            )
        signal = live_teacher(teacher.model, view, trained_rows(view["labels"])[0], None)[0]
        padded = batch[f"align/{teacher.name}/student_pos"]
        valid = padded >= 0  # row-major, as the teacher's marked positions come out of its mask
        example = valid.nonzero()[:, 0]
        student_pos, one_to_one = padded[valid], batch[f"align/{teacher.name}/one_to_one"][valid]
    count = signal.ids.shape[0] if isinstance(signal, Sparse) else signal.hidden.shape[0]
    if count != example.numel():
        raise KdistillError(
            f"teacher {teacher.name!r} gives {count} aligned rows for this batch, the alignment has "
            f"{example.numel()}; rebuild its cache with `kdistill cache`"
        )
    return Aligned(teacher, signal, example, student_pos, one_to_one)
