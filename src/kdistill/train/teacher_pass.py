"""The teachers' side of a batch: live forward passes, cache reads, and aligned teachers.

A live teacher runs under inference mode and stops at its final hidden states at the rows that
train; its head is applied later, chunk by chunk, by the loss. A cached teacher is read from disk.
A teacher of another tokenizer reads its own tokens (`data.cross`) and is compared at aligned pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from kdistill.data import IGNORE_INDEX
from kdistill.errors import KdistillError
from kdistill.losses.hidden import require_live_teacher
from kdistill.losses.vocab_map import VocabMap
from kdistill.teacher.cache import TeacherCache
from kdistill.teacher.signal import DenseHidden, Ensemble, Sparse


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: nn.Module, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's weight `(V, H)` and bias, cut to the shared vocabulary."""
    head = _base(model).get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if vocab_size is not None and vocab_size < weight.shape[0]:  # else the parameter itself, not a view
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    return weight, bias


def softcap(model: nn.Module) -> float | None:
    return getattr(_base(model).config, "final_logit_softcapping", None)


def trained_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask `(B, T-1)` of positions whose next token trains, and those targets `(N,)`."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return mask, targets[mask]


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
    out = _base(teacher).get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra
    )
    states = {t: out.hidden_states[t][:, :-1][mask] for t in set(layers)}
    return out.last_hidden_state[:, :-1][mask], states


@dataclass
class Teacher:
    """One teacher: exactly one of `model` (run live) and `cache` (read from disk).

    `mapping` is set when the teacher's tokenizer differs from the student's: the batch then holds
    its own tokens and the aligned positions (`data.cross`), or its cache holds them.
    """

    name: str
    weight: float  # normalised over the run's teachers
    model: nn.Module | None = None
    cache: TeacherCache | None = None
    mapping: VocabMap | None = None


@dataclass
class Aligned:
    """A teacher of another tokenizer on one batch: its signal at the aligned pairs, and the pairs."""

    teacher: Teacher
    signal: DenseHidden | Sparse  # (N, ...) at the teacher's side of each pair
    example: torch.Tensor  # (N,) batch row of each pair
    student_pos: torch.Tensor  # (N,) the student's position in that row
    one_to_one: torch.Tensor  # (N,) bool


def aligned_teacher(teacher: Teacher, batch: dict[str, Any], split: str) -> Aligned:
    """Run (or read) a teacher of another tokenizer at the batch's aligned pairs."""
    device = batch["input_ids"].device
    if teacher.cache is not None:
        signal = _to_device(teacher.cache.signal(split, batch["row"].cpu()), device)
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


def teacher_signal(
    teacher: nn.Module,
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor,
    vocab: int | None,
) -> DenseHidden:
    """A live teacher's hidden states at the trained rows, with its head; logits come later, by chunk."""
    return live_teacher(teacher, batch, mask, vocab)[0]


def live_teacher(
    teacher: nn.Module,
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor,
    vocab: int | None,
    layers: Sequence[int] = (),
) -> tuple[DenseHidden, dict[int, torch.Tensor]]:
    """`teacher_signal`, and the states `(N, H)` of the teacher's `layers` from the same forward pass."""
    hidden, states = teacher_hidden(teacher, batch, mask, layers)
    # Cloning outside inference mode turns the rows into ordinary tensors the loss may save for backward.
    weight, bias = output_head(teacher, vocab)
    signal = DenseHidden(hidden=hidden.clone(), head=weight, bias=bias, softcap=softcap(teacher))
    return signal, {t: s.clone() for t, s in states.items()}


def combined_signal(
    teachers: list[Teacher],
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor,
    split: str,
    vocab: int | None,
    mode: str,
) -> DenseHidden | Sparse | Ensemble:
    """The teachers' signal for a batch's trained rows: one teacher's own, or an `Ensemble`."""
    return teacher_outputs(teachers, batch, mask, split, vocab, mode)[0]


def teacher_outputs(
    teachers: list[Teacher],
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor,
    split: str,
    vocab: int | None,
    mode: str,
    layers: Sequence[Sequence[int]] | None = None,
) -> tuple[DenseHidden | Sparse | Ensemble, list[dict[int, torch.Tensor]]]:
    """`combined_signal`, and per teacher the states `(N, H)` of its `layers[i]` (a cached one: none)."""
    signals, states = [], []
    for i, teacher in enumerate(teachers):
        wanted = layers[i] if layers is not None else ()
        if teacher.cache is not None:
            if wanted:  # setup refuses this first; kept so that no caller gets a silent zero loss
                require_live_teacher(True, str(teacher.cache.folder), teacher.name)
            if "row" not in batch:
                raise KdistillError("a cached teacher needs each batch's dataset row indices (batch['row'])")
            signal = teacher.cache.signal(split, batch["row"].cpu())
            signal = _to_device(signal, mask.device)
            if signal.ids.shape[0] != int(mask.sum()):
                raise KdistillError(
                    f"teacher cache {teacher.cache.folder} holds {signal.ids.shape[0]} tokens for this "
                    f"batch, the batch trains {int(mask.sum())}; rebuild it with `kdistill cache`"
                )
            layer_states = {}
        else:
            signal, layer_states = live_teacher(teacher.model, batch, mask, vocab, wanted)
        signals.append(signal)
        states.append(layer_states)
    if len(signals) == 1:
        return signals[0], states
    return Ensemble(tuple(signals), tuple(t.weight for t in teachers), mode), states


def _to_device(signal: Sparse, device: torch.device) -> Sparse:
    if signal.ids.device == device:
        return signal
    tail = None if signal.tail is None else signal.tail.to(device)
    return replace(signal, ids=signal.ids.to(device), logprobs=signal.logprobs.to(device), tail=tail)


def as_teachers(teacher: nn.Module | list[Teacher] | None) -> list[Teacher]:
    """A bare model (or None) as a one-teacher list, so callers with one live teacher stay simple."""
    if teacher is None:
        return []
    return teacher if isinstance(teacher, list) else [Teacher("teacher", 1.0, model=teacher)]
