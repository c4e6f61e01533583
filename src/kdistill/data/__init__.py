"""Data: sources, formats, templates with prompt masking, and the collator."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from kdistill.config import DataConfig
from kdistill.data.alignment import teacher_view
from kdistill.data.formats import Example, detect_format, to_examples
from kdistill.data.sources import load_rows
from kdistill.data.tokenize import IGNORE_INDEX, Collator, Tokenized, tokenize_examples, trained_rows
from kdistill.errors import KdistillError

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "DataSplits",
    "Dropped",
    "Example",
    "Tokenized",
    "build_datasets",
    "load_examples",
    "tokenize_examples",
    "split_examples",
    "tokenize_with_views",
    "trained_rows",
]


@dataclass(frozen=True)
class Dropped:
    """Rows of one split that have nothing to learn, and why."""

    empty: int = 0  # the response is empty or only whitespace
    length: int = 0  # no response token left within data.max_length

    @property
    def total(self) -> int:
        return self.empty + self.length

    def describe(self) -> str:
        """`3 dropped: 1 with an empty response, 2 with no response token within data.max_length`."""
        why = [
            f"{n} with {what}"
            for n, what in (
                (self.empty, "an empty response"),
                (self.length, "no response token within data.max_length"),
            )
            if n
        ]
        return f"{self.total} dropped" + (f": {', '.join(why)}" if why else "")


@dataclass
class DataSplits:
    train: list[Tokenized]
    validation: list[Tokenized]
    dropped_train: Dropped
    dropped_validation: Dropped
    format: str

    @property
    def dropped(self) -> int:
        return self.dropped_train.total + self.dropped_validation.total

    def describe(self) -> str:
        """One line on the rows each split keeps and drops, naming an empty held-out split."""
        line = (
            f"{len(self.train)} training rows ({self.dropped_train.describe()}), {len(self.validation)} "
            f"validation rows ({self.dropped_validation.describe()}), format {self.format}"
        )
        if not self.validation:
            line += "; every validation row was dropped, so there will be no held-out metrics (eval/...)"
        return line


def load_examples(source: str, split: str = "train", fmt: str = "auto") -> tuple[list[Example], str]:
    rows = load_rows(source, split)
    fmt = detect_format(rows, source) if fmt == "auto" else fmt
    return to_examples(rows, fmt, source), fmt


def build_datasets(
    cfg: DataConfig,
    tokenizer: object,
    seed: int,
    respond: Callable[[list[Example]], list[Example]] | None = None,
    teacher_tokenizers: dict[str, Any] | None = None,
) -> DataSplits:
    """Read, split, (optionally) re-answer with the teacher, and tokenize the training data.

    `respond` replaces responses by the teacher's (`data.responses: teacher`); the caller builds it
    so that this package never loads a model. `teacher_tokenizers` names the teachers whose
    tokenizer differs from the student's: each row then carries their aligned views (`data.alignment`).
    """
    train, fmt = load_examples(cfg.source, cfg.split, cfg.format)
    if cfg.max_rows:
        train = train[: cfg.max_rows]
    if cfg.validation_source:
        validation, _ = load_examples(cfg.validation_source, "validation", cfg.format)
    else:
        train, validation = split_examples(train, cfg.validation_size, seed, cfg.source)
    if respond is not None:
        train = respond(train)
    views = teacher_tokenizers or {}
    train, empty_train = with_response(train)
    validation, empty_val = with_response(validation)
    if not train:
        raise KdistillError(
            f"{cfg.source}: all {empty_train} training rows have an empty response (and {empty_val} of the "
            f"{empty_val + len(validation)} held-out rows); nothing to learn"
        )
    train_tok, long_train = tokenize_with_views(train, tokenizer, cfg.max_length, views)
    val_tok, long_val = tokenize_with_views(validation, tokenizer, cfg.max_length, views)
    if not train_tok:
        raise KdistillError(
            f"{cfg.source}: no training row has a response token left within "
            f"data.max_length={cfg.max_length}; "
            "raise data.max_length or shorten the prompts"
        )
    train_tok = [replace(row, index=i) for i, row in enumerate(train_tok)]
    val_tok = [replace(row, index=i) for i, row in enumerate(val_tok)]
    return DataSplits(train_tok, val_tok, Dropped(empty_train, long_train), Dropped(empty_val, long_val), fmt)


def with_response(examples: list[Example]) -> tuple[list[Example], int]:
    """The examples whose response has text, and how many had none: those would train on an
    end-of-turn token alone."""
    kept = [e for e in examples if e.response.strip()]
    return kept, len(examples) - len(kept)


def tokenize_with_views(
    examples: list[Example], tokenizer: Any, max_length: int, teachers: dict[str, Any]
) -> tuple[list[Tokenized], int]:
    """`tokenize_examples`, plus each row's view for every teacher of another tokenizer."""
    if not teachers:
        return tokenize_examples(examples, tokenizer, max_length)
    rows, dropped = [], 0
    for example in examples:  # one at a time: a row dropped for length must not shift the views
        kept, lost = tokenize_examples([example], tokenizer, max_length)
        dropped += lost
        views = {name: teacher_view(example, tokenizer, tok, max_length) for name, tok in teachers.items()}
        rows += [replace(row, views=views) for row in kept]
    return rows, dropped


def split_examples(
    examples: list[Example], size: float, seed: int, source: str
) -> tuple[list[Example], list[Example]]:
    """`(train, held out)`: `size` rows (a share below 1, else a count) drawn with `seed`."""
    count = int(size) if size >= 1 else max(1, round(size * len(examples)))
    if count >= len(examples):
        raise KdistillError(
            f"{source}: data.validation_size={size} leaves no training rows out of {len(examples)}"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]
