"""A live teacher: a frozen model run under inference mode on each batch.

It stops at its final hidden states at the rows that train; its head is applied later, chunk by
chunk, by the loss. A teacher of another tokenizer runs on its own tokens (`data.alignment`), which
the batch carries beside the student's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from kdistill.data import trained_rows
from kdistill.errors import KdistillError
from kdistill.losses import DenseHidden
from kdistill.models.parts import base_model, output_head, softcap
from kdistill.teacher.base import Teacher, TeacherSignal


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


@dataclass
class LiveTeacher(Teacher):
    """A teacher model run in this process: it has hidden states and scores any rows."""

    model: nn.Module

    has_hidden: ClassVar[bool] = True
    grades_samples: ClassVar[bool] = True
    runs_here: ClassVar[bool] = True

    def signal(
        self, batch: dict[str, Any], split: str, vocab: int | None = None, layers: Sequence[int] = ()
    ) -> TeacherSignal:
        if self.mapping is None:
            mask = trained_rows(batch["labels"])[0]
            return TeacherSignal(*live_teacher(self.model, batch, mask, vocab, layers))
        # Another tokenizer: the batch holds the teacher's own view and where its rows meet the student's.
        prefix = f"teacher/{self.name}/"
        view = {k.removeprefix(prefix): v for k, v in batch.items() if k.startswith(prefix)}
        if not view:
            raise KdistillError(
                f"teacher {self.name!r} has another tokenizer but the batch holds no view of it"
            )
        values = live_teacher(self.model, view, trained_rows(view["labels"])[0], None)[0]
        padded = batch[f"align/{self.name}/student_pos"]
        valid = padded >= 0  # row-major, as the teacher's marked positions come out of its mask
        one_to_one = batch[f"align/{self.name}/one_to_one"][valid]
        return TeacherSignal(values, pairs=(valid.nonzero()[:, 0], padded[valid], one_to_one))

    def local_models(self) -> list[nn.Module]:
        return [self.model]
