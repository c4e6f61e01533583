"""`kdistill cache`: run every teacher that has both a model and a cache folder over the data once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdistill.config import RunConfig
from kdistill.data import Collator
from kdistill.data.alignment import TeacherView
from kdistill.data.tokenize import IGNORE_INDEX
from kdistill.errors import KdistillError
from kdistill.files import check_space
from kdistill.models.build import load_teacher
from kdistill.teacher.cache_build import build_cache, save_vocab_map
from kdistill.teacher.live import live_teacher
from kdistill.teacher.packing import bytes_per_token
from kdistill.teacher.responses import load_data
from kdistill.teacher.roster import cache_header, cache_spec, checked_server, compact_teacher
from kdistill.teacher.vocabularies import load_vocabularies


def cache_teachers(cfg: RunConfig, device: torch.device) -> list[tuple[str, dict[str, Any]]]:
    """`kdistill cache`: run every teacher that has both a model and a cache folder over the data; a
    served teacher (`teacher.server`) is asked its servers instead of being loaded."""
    todo = [(name, t) for name, t in cfg.teacher_list() if t.cache is not None and t.model is not None]
    if not todo:
        raise KdistillError(
            "no teacher has both `model` and `cache`: set teacher.cache to the folder the cache is written to"
        )
    vocabs = load_vocabularies(cfg)
    spec = cache_spec(cfg)
    data, written = None, []
    for name, t in todo:
        width = vocabs.cross_width.get(name, vocabs.width)
        if spec.tail_samples and spec.top_k >= width:
            raise KdistillError(
                f"cache.top_k={spec.top_k} keeps the whole {width}-token vocabulary; set cache.tail_samples=0"
            )
        if t.server:
            data = data or load_data(cfg, vocabs.tokenizer, None, vocabs.cross)
            forward, status = _served_forward(cfg, t, name, name in vocabs.cross, vocabs.tokenizer, data)
        else:
            model = load_teacher(t, device)
            compact_teacher(name, t, model)
            data = data or load_data(cfg, vocabs.tokenizer, model, vocabs.cross)
            forward, status = _live_forward(model, width, device), dict
        header = cache_header(cfg, t, vocabs, data, name)

        folder = Path(t.cache)
        if name in vocabs.cross:  # the teacher reads its own tokens; the alignment is stored with it
            splits = {
                "train": [r.views[name] for r in data.train],
                "validation": [r.views[name] for r in data.validation],
            }
            collate = _view_collator(vocabs.cross[name].pad_token_id)
            folder.mkdir(parents=True, exist_ok=True)
            save_vocab_map(folder, vocabs.mapping(name))
            extras = _alignment_of
        else:
            splits = {"train": data.train, "validation": data.validation}
            collate, extras = Collator(vocabs.tokenizer.pad_token_id), None
        _check_space(folder, splits, spec.top_k + spec.tail_samples, width, extras is not None)
        manifest = build_cache(folder, forward, splits, header, spec, collate, width, extras, status)
        written.append((name, manifest))
        del forward
    return written


def _check_space(folder: Path, splits: dict[str, list[Any]], entries: int, width: int, aligned: bool) -> None:
    """Refuse a cache that cannot fit where it goes (warn when it barely does): its size is the trained
    tokens times the bytes each stores (`packing.bytes_per_token`, and 5 more for an alignment)."""
    tokens = sum(_stored(row) for rows in splits.values() for row in rows)
    size = tokens * (bytes_per_token(entries, width) + (5 if aligned else 0))
    what = f"the cache ({tokens:,} trained tokens, {entries} entries each)"
    check_space(folder, size, what, "teacher.cache")


def _stored(row: Any) -> int:
    """The entries a row stores: its trained tokens, or a teacher view's aligned pairs."""
    pairs = getattr(row, "student_pos", None)  # a `TeacherView` (another tokenizer)
    if pairs is not None:
        return len(pairs)
    return sum(label != IGNORE_INDEX for label in row.labels[1:])


def _live_forward(model: Any, width: int, device: torch.device) -> Callable:
    """`(batch, mask) -> (N, V)` logits of an in-process teacher at the trained rows."""

    def forward(batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in batch.items()}
        signal = live_teacher(model, batch, mask.to(device), width)[0]
        return signal.rows(0, signal.hidden.shape[0])

    return forward


def _served_forward(
    cfg: RunConfig, teacher: Any, name: str, cross: bool, tokenizer: Any, data: Any
) -> tuple[Callable, Callable]:
    """`(batch, mask) -> Sparse` of a served teacher at the trained rows (its top k; no tail samples),
    and what the progress bar shows of it: its requests' retries, once there are some."""
    if cfg.cache.tail_samples:
        raise KdistillError(
            f"teacher {name!r} is served: a server gives its top k only, so its cache holds no tail samples; "
            "set cache.tail_samples: 0"
        )
    server = checked_server(cfg, teacher, name, cross, tokenizer, data)
    return (
        lambda batch, mask: server.signal(batch),
        lambda: {"retries": server.retries} if server.retries else {},
    )


def _view_collator(pad_token_id: int) -> Any:
    collator = Collator(pad_token_id)
    return lambda views: collator.pad([v.as_row(-1) for v in views], pad_token_id)


def _alignment_of(view: TeacherView) -> dict[str, torch.Tensor]:
    """What a cache stores per compared pair besides the teacher's outputs: the student's side."""
    return {
        "student_pos": torch.tensor(view.student_pos, dtype=torch.int32),
        "one_to_one": torch.tensor(view.one_to_one, dtype=torch.uint8),
    }
