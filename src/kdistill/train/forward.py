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
from kdistill.losses import DEFAULT_CHUNK_SIZE, LossSums, distill_loss_sums
from kdistill.teacher.signal import DenseHidden


@dataclass(frozen=True)
class LossSettings:
    """Plain values the loss needs; built from the config once, by `kdistill.train.loop`."""

    alpha: float
    temperature: float
    divergence: str = "forward_kl"
    divergence_kwargs: dict | None = None
    chunk_size: int | None = DEFAULT_CHUNK_SIZE
    vocab_size: int | None = None  # common logit width when the two heads are padded differently


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
def _teacher_hidden(teacher: nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    hidden = (
        _base(teacher)
        .get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        .last_hidden_state
    )
    return hidden[:, :-1][mask]


def teacher_signal(
    teacher: nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor, vocab: int | None
) -> Any:
    # Cloning outside inference mode turns the rows into ordinary tensors the loss may save for backward.
    hidden = _teacher_hidden(teacher, batch, mask).clone()
    weight, bias = output_head(teacher, vocab)
    return DenseHidden(hidden=hidden, head=weight, bias=bias, softcap=softcap(teacher))


def batch_loss(
    student: nn.Module,
    teacher: nn.Module | None,
    batch: dict[str, Any],
    settings: LossSettings,
    signal: DenseHidden | None = None,
) -> tuple[LossSums, int]:
    """Loss sums over the batch's trained tokens, and how many tokens that is.

    `signal` is the teacher's output for this batch when the caller already has it (evaluation
    reuses it across passes); otherwise the live teacher runs.
    """
    mask, targets = trained_rows(batch["labels"])
    hidden = student(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
    inner = student.module.model if hasattr(student, "module") else student.model
    weight, bias = output_head(inner, settings.vocab_size)
    use_teacher = teacher is not None and settings.alpha > 0
    if use_teacher and signal is None:
        signal = teacher_signal(teacher, batch, mask, settings.vocab_size)
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
