"""Data: sources, formats, templates with prompt masking, and the collator."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from kdistill.config import DataConfig
from kdistill.data.formats import Example, detect_format, to_examples
from kdistill.data.sources import load_rows
from kdistill.data.tokenize import IGNORE_INDEX, Collator, Tokenized, tokenize_examples
from kdistill.errors import KdistillError

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "DataSplits",
    "Example",
    "Tokenized",
    "build_datasets",
    "load_examples",
]


@dataclass
class DataSplits:
    train: list[Tokenized]
    validation: list[Tokenized]
    dropped: int  # rows with no response token left after truncation
    format: str


def load_examples(source: str, split: str = "train", fmt: str = "auto") -> tuple[list[Example], str]:
    rows = load_rows(source, split)
    fmt = detect_format(rows, source) if fmt == "auto" else fmt
    return to_examples(rows, fmt, source), fmt


def build_datasets(
    cfg: DataConfig,
    tokenizer: object,
    seed: int,
    respond: Callable[[list[Example]], list[Example]] | None = None,
) -> DataSplits:
    """Read, split, (optionally) re-answer with the teacher, and tokenize the training data.

    `respond` replaces responses by the teacher's (`data.responses: teacher`); the caller builds it
    so that this package never loads a model.
    """
    train, fmt = load_examples(cfg.source, cfg.split, cfg.format)
    if cfg.max_rows:
        train = train[: cfg.max_rows]
    if cfg.validation_source:
        validation, _ = load_examples(cfg.validation_source, "validation", cfg.format)
    else:
        train, validation = _split(train, cfg.validation_size, seed, cfg.source)
    if respond is not None:
        train = respond(train)
    train_tok, dropped_train = tokenize_examples(train, tokenizer, cfg.max_length)
    val_tok, dropped_val = tokenize_examples(validation, tokenizer, cfg.max_length)
    if not train_tok:
        raise KdistillError(
            f"{cfg.source}: no training row has a response token left within "
            f"data.max_length={cfg.max_length}; "
            "raise data.max_length or shorten the prompts"
        )
    train_tok = [replace(row, index=i) for i, row in enumerate(train_tok)]
    val_tok = [replace(row, index=i) for i, row in enumerate(val_tok)]
    return DataSplits(train_tok, val_tok, dropped_train + dropped_val, fmt)


def _split(
    examples: list[Example], size: float, seed: int, source: str
) -> tuple[list[Example], list[Example]]:
    count = int(size) if size >= 1 else max(1, round(size * len(examples)))
    if count >= len(examples):
        raise KdistillError(
            f"{source}: data.validation_size={size} leaves no training rows out of {len(examples)}"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]
