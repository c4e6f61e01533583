"""Responses the student wrote, as teachers of another tokenizer read them.

A dataset row carries each such teacher's view from when the data was built (`data.alignment`). A
response sampled during training is new, so on an on-policy step every row is aligned again: the
student's sampled tokens stay exactly as sampled, and the teacher reads the example's prompt and the
response's text through its own template (`generated_view`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kdistill.data import Collator
from kdistill.data.alignment import generated_view
from kdistill.data.tokenize import IGNORE_INDEX, Tokenized

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TeacherViews:
    """What re-aligns the student's responses for the teachers of another tokenizer (`teachers`, name
    -> tokenizer; none: the written batches are read as they are)."""

    train: list[Tokenized] = field(default_factory=list)
    tokenizer: Any = None
    teachers: dict[str, Any] = field(default_factory=dict)
    max_length: int = 0  # the longest sequence: data.max_length + max_new_tokens

    def apply(self, window: list[Batch], written: list[Batch], collator: Collator) -> list[Batch]:
        """`written` (the student's batches for `window`) as every teacher here reads it."""
        if not self.teachers:
            return written
        args = (self.train, self.tokenizer, self.teachers, self.max_length, collator)
        return with_teacher_views(window, written, *args)


def with_teacher_views(
    window: list[dict[str, torch.Tensor]],
    written: list[dict[str, torch.Tensor]],
    train: list[Tokenized],
    tokenizer: Any,
    teachers: dict[str, Any],
    max_length: int,
    collator: Collator,
) -> list[dict[str, torch.Tensor]]:
    """`written` (the student's batches for the dataset batches `window`) with the views of every
    teacher in `teachers` (name -> tokenizer). `train` finds each row's prompt by its `row` index."""
    out = []
    for batch, generated in zip(window, written):
        items = []
        for b, index in enumerate(batch["row"].tolist()):
            prompt_ids, response_ids = _split(generated, b)
            prompt = next(iter(train[index].views.values())).prompt
            views = {
                name: generated_view(prompt, prompt_ids, response_ids, tokenizer, tok, max_length)
                for name, tok in teachers.items()
            }
            items.append(
                Tokenized(
                    prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids, -1, views
                )
            )
        device = generated["input_ids"].device
        out.append({k: v.to(device) for k, v in collator(items).items()})
    return out


def _split(batch: dict[str, torch.Tensor], b: int) -> tuple[list[int], list[int]]:
    """Row `b` of a written batch as its prompt ids and the sampled response ids."""
    n = int(batch["attention_mask"][b].sum())
    ids, labels = batch["input_ids"][b, :n].tolist(), batch["labels"][b, :n].tolist()
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), n)
    return ids[:first], ids[first:]
