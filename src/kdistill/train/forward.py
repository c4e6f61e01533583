"""One batch through student and teacher, down to the loss sums.

Logits are never computed for the whole sequence: both models stop at their final hidden states,
only the rows that train (response tokens) are kept, and the loss projects those through the
output head chunk by chunk. In a padded instruction batch most positions are prompt or padding,
so this alone removes most of the head's work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill.data import IGNORE_INDEX
from kdistill.errors import KdistillError
from kdistill.losses import DEFAULT_CHUNK_SIZE, LossSums, distill_loss_sums
from kdistill.teacher.cache import TeacherCache
from kdistill.teacher.signal import DenseHidden, Ensemble, Sparse


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


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: nn.Module, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's weight `(V, H)` and bias, cut to the shared vocabulary."""
    head = _base(model).get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if vocab_size is not None:
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    return weight, bias


def softcap(model: nn.Module) -> float | None:
    return getattr(_base(model).config, "final_logit_softcapping", None)


class StudentHidden(nn.Module):
    """Wraps the student so its forward returns final hidden states, not logits.

    Going through one module's forward keeps DDP/FSDP wrappers in charge of gradient sync.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        decoder = _base(self.model).get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def trained_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask `(B, T-1)` of positions whose next token trains, and those targets `(N,)`."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return mask, targets[mask]


@torch.inference_mode()
def teacher_hidden(teacher: nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The teacher's final hidden states `(N, H)` at the trained rows, without autograd."""
    hidden = (
        _base(teacher)
        .get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        .last_hidden_state
    )
    return hidden[:, :-1][mask]


@dataclass
class Teacher:
    """One teacher: exactly one of `model` (run live) and `cache` (read from disk)."""

    name: str
    weight: float  # normalised over the run's teachers
    model: nn.Module | None = None
    cache: TeacherCache | None = None


def teacher_signal(
    teacher: nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor, vocab: int | None
) -> DenseHidden:
    """A live teacher's hidden states at the trained rows, with its head; logits come later, by chunk."""
    # Cloning outside inference mode turns the rows into ordinary tensors the loss may save for backward.
    hidden = teacher_hidden(teacher, batch, mask).clone()
    weight, bias = output_head(teacher, vocab)
    return DenseHidden(hidden=hidden, head=weight, bias=bias, softcap=softcap(teacher))


def combined_signal(
    teachers: list[Teacher],
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor,
    split: str,
    vocab: int | None,
    mode: str,
) -> DenseHidden | Sparse | Ensemble:
    """The teachers' signal for a batch's trained rows: one teacher's own, or an `Ensemble`."""
    signals = []
    for teacher in teachers:
        if teacher.cache is not None:
            if "row" not in batch:
                raise KdistillError("a cached teacher needs each batch's dataset row indices (batch['row'])")
            signal = teacher.cache.signal(split, batch["row"].cpu())
            signal = _to_device(signal, mask.device)
            if signal.ids.shape[0] != int(mask.sum()):
                raise KdistillError(
                    f"teacher cache {teacher.cache.folder} holds {signal.ids.shape[0]} tokens for this "
                    f"batch, the batch trains {int(mask.sum())}; rebuild it with `kdistill cache`"
                )
        else:
            signal = teacher_signal(teacher.model, batch, mask, vocab)
        signals.append(signal)
    if len(signals) == 1:
        return signals[0]
    return Ensemble(tuple(signals), tuple(t.weight for t in teachers), mode)


def _to_device(signal: Sparse, device: torch.device) -> Sparse:
    if signal.ids.device == device:
        return signal
    return Sparse(
        signal.ids.to(device),
        signal.logprobs.to(device),
        signal.num_top,
        signal.tail.to(device),
        signal.temperature,
    )


def as_teachers(teacher: nn.Module | list[Teacher] | None) -> list[Teacher]:
    """A bare model (or None) as a one-teacher list, so callers with one live teacher stay simple."""
    if teacher is None:
        return []
    return teacher if isinstance(teacher, list) else [Teacher("teacher", 1.0, model=teacher)]


def batch_loss(
    student: nn.Module,
    teacher: nn.Module | list[Teacher] | None,
    batch: dict[str, Any],
    settings: LossSettings,
    signal: DenseHidden | Sparse | Ensemble | None = None,
    split: str = "train",
) -> tuple[LossSums, int]:
    """Loss sums over the batch's trained tokens, and how many tokens that is.

    `signal` is the teachers' output for this batch when the caller already has it (evaluation
    reuses it across passes); otherwise live teachers run and cached ones are read (rows of `split`).
    """
    mask, targets = trained_rows(batch["labels"])
    hidden = student(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
    inner = student.module.model if hasattr(student, "module") else student.model
    weight, bias = output_head(inner, settings.vocab_size)
    teachers = as_teachers(teacher)
    use_teacher = bool(teachers) and settings.alpha > 0
    if use_teacher and signal is None:
        signal = combined_signal(teachers, batch, mask, split, settings.vocab_size, settings.multi_teacher)
    sums = distill_loss_sums(
        hidden,
        weight,
        targets,
        signal,
        kd_weight=settings.alpha * settings.temperature**2 if use_teacher else 0.0,
        ce_weight=1.0 - settings.alpha if use_teacher else 1.0,
        temperature=settings.temperature,
        divergence=settings.divergence,
        divergence_kwargs=settings.divergence_kwargs,
        chunk_size=settings.chunk_size,
        student_bias=bias,
        student_softcap=softcap(inner),
    )
    return sums, int(targets.numel())
