"""Calibration rows: the training rows whose activations score a pruned student's units."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from kdistill.config import RunConfig
from kdistill.data import (
    Collator,
    Example,
    Tokenized,
    load_examples,
    split_examples,
    tokenize_examples,
    with_response,
)


def load_calibration(cfg: RunConfig, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    """Batches of `from_teacher.calibration_rows` training rows drawn with the run's seed (on the CPU);
    none for a student that is not pruned by importance.

    The rows come from the training split as `build_datasets` makes it (the same held-out draw), so
    no held-out row is calibrated on. Responses are the dataset's, also under `data.responses: teacher`.
    """
    settings = cfg.student.from_teacher
    if settings is None or settings.method != "importance":
        return []
    train, _ = _splits(cfg)
    drawn = random.Random(cfg.training.seed).sample(train, min(len(train), settings.calibration_rows))
    return _batches(drawn, tokenizer, cfg.data.max_length, settings.calibration_batch_size)


HELD_OUT_BATCH = 4  # held-out rows per batch


def load_held_out(
    cfg: RunConfig, tokenizer: Any, rows: int, batch_size: int = HELD_OUT_BATCH
) -> list[dict[str, torch.Tensor]]:
    """Batches of the first `rows` held-out rows, as training holds them out."""
    return _batches(held_out_examples(cfg, rows), tokenizer, cfg.data.max_length, batch_size)


def held_out_examples(cfg: RunConfig, rows: int) -> list[Example]:
    """The first `rows` held-out examples, as training holds them out."""
    return _splits(cfg)[1][:rows]


def _splits(cfg: RunConfig) -> tuple[list[Example], list[Example]]:
    """The training and held-out examples with a response, drawn as `data.build_datasets` draws them."""
    data = cfg.data
    train, _ = load_examples(data.source, data.split, data.format)
    train = train[: data.max_rows] if data.max_rows else train
    if data.validation_source:
        validation, _ = load_examples(data.validation_source, "validation", data.format)
    else:
        train, validation = split_examples(train, data.validation_size, cfg.training.seed, data.source)
    return with_response(train)[0], with_response(validation)[0]


def _batches(
    examples: list[Example], tokenizer: Any, max_length: int, size: int
) -> list[dict[str, torch.Tensor]]:
    rows = tokenize_examples(examples, tokenizer, max_length)[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return list(padded_batches(rows, size, pad, torch.device("cpu")))


def padded_batches(
    rows: list[Tokenized], batch_size: int, pad_id: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """`input_ids`, `attention_mask` and `labels` `(B, T)` (the training collator's), longest rows first."""
    collate = Collator(pad_token_id=pad_id)
    ordered = sorted(rows, key=lambda r: -len(r.input_ids))
    for start in range(0, len(ordered), batch_size):
        batch = collate([replace(r, index=-1, views=None) for r in ordered[start : start + batch_size]])
        yield {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "labels")}
