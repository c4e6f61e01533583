"""The order in which a run sees its training rows: fixed per (seed, epoch), so a resumed run
sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader

from kdistill.data import Collator

T = TypeVar("T")
_END = object()


def epoch_loader(data: list[Any], batch_size: int, seed: int, epoch: int, collator: Collator) -> DataLoader:
    # A fixed order per (seed, epoch) makes a resumed run see exactly the batches it would have seen.
    batches = length_grouped_batches([len(x.input_ids) for x in data], batch_size, seed * 1000 + epoch)
    return DataLoader(data, batch_sampler=batches, collate_fn=collator)


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, group: int = 16
) -> list[list[int]]:
    """Shuffled batches of row indices, each holding rows of similar length.

    Rows are shuffled, cut into groups of `group` batches, sorted by length inside each group, and
    the resulting batches are shuffled again. Padding shrinks (in one random batch of instruction
    data about a third of the tokens were padding) while every epoch still sees a new order.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    span = batch_size * group
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]


def windows(loader: DataLoader, size: int) -> Any:
    window = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def ahead(items: Iterable[T]) -> Iterator[tuple[T, T | None]]:
    """Each item with the one after it (None after the last)."""
    it = iter(items)
    current = next(it, _END)
    while current is not _END:
        following = next(it, _END)
        yield current, (None if following is _END else following)
        current = following
