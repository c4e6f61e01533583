"""The teachers of a run as the loop sees them: each a live model or a cache, with its weight.

`build_teachers` and `cache_header` read the config; everything they return is plain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.config import RunConfig, TeacherConfig
from kdistill.data import Collator, DataSplits
from kdistill.errors import KdistillError
from kdistill.models.build import load_teacher, teacher_source
from kdistill.teacher.cache import CacheSpec, TeacherCache, build_cache
from kdistill.teacher.cache_format import rows_fingerprint, tokenizer_fingerprint
from kdistill.train.forward import Teacher, teacher_signal


def cache_command(config_path: str) -> str:
    return f"kdistill cache {config_path}"


def cache_header(
    cfg: RunConfig, teacher: TeacherConfig | None, tokenizer: Any, data: DataSplits, vocab_size: int
) -> dict[str, Any]:
    """What a cache records about how it was built, and what training checks it against."""
    d = cfg.data
    settings = ("source", "split", "format", "validation_source", "validation_size", "max_rows", "responses")
    return {
        "teacher": None if teacher is None or teacher.model is None else teacher_source(teacher).identity,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "top_k": cfg.cache.top_k,
        "tail_samples": cfg.cache.tail_samples,
        "temperature": cfg.loss.temperature,
        "temperature_by_split": {"train": cfg.loss.temperature, "validation": 1.0},
        "max_length": d.max_length,
        "data_settings": {**{k: getattr(d, k) for k in settings}, "seed": cfg.training.seed},
        "fingerprints": {
            "train": rows_fingerprint(data.train),
            "validation": rows_fingerprint(data.validation),
        },
        "vocab_size": vocab_size,
    }


def cache_spec(cfg: RunConfig) -> CacheSpec:
    t = cfg.training
    return CacheSpec(
        top_k=cfg.cache.top_k,
        tail_samples=cfg.cache.tail_samples,
        temperatures={"train": cfg.loss.temperature, "validation": 1.0},
        rows_per_shard=cfg.cache.rows_per_shard,
        batch_size=cfg.cache.batch_size or t.eval_batch_size or t.batch_size,
        seed=t.seed,
    )


def load_live_teachers(cfg: RunConfig, device: torch.device) -> dict[str, nn.Module]:
    """Every teacher without a cache, loaded; cached teachers load no model at all."""
    return {name: load_teacher(t, device) for name, t in cfg.teacher_list() if t.cache is None}


def build_teachers(
    cfg: RunConfig,
    live: dict[str, nn.Module],
    tokenizer: Any,
    data: DataSplits,
    vocab_size: int,
    config_path: str,
) -> list[Teacher]:
    """The run's teachers with normalised weights; caches are opened and checked against the config."""
    named = cfg.teacher_list()
    total = sum(t.weight for _, t in named)
    teachers = []
    for name, t in named:
        cache = None
        if t.cache is not None:
            wanted = cache_header(cfg, t, tokenizer, data, vocab_size)
            cache = TeacherCache.open(t.cache, wanted, cache_command(config_path))
        teachers.append(Teacher(name, t.weight / total, live.get(name), cache))
    return teachers


def cache_teachers(cfg: RunConfig, device: torch.device) -> list[tuple[str, dict[str, Any]]]:
    """`kdistill cache`: run every teacher that has both a model and a cache folder over the data."""
    from kdistill.train.setup import check_models, load_data  # setup imports this module

    todo = [(name, t) for name, t in cfg.teacher_list() if t.cache is not None and t.model is not None]
    if not todo:
        raise KdistillError(
            "no teacher has both `model` and `cache`: set teacher.cache to the folder the cache is written to"
        )
    tokenizer, vocab_size = check_models(cfg)
    spec = cache_spec(cfg)
    if spec.tail_samples and spec.top_k >= vocab_size:
        raise KdistillError(
            f"cache.top_k={spec.top_k} keeps the whole {vocab_size}-token vocabulary; "
            "set cache.tail_samples=0"
        )
    collate = Collator(tokenizer.pad_token_id)
    data, written = None, []
    for name, t in todo:
        model = load_teacher(t, device)
        data = data or load_data(cfg, tokenizer, model)
        header = cache_header(cfg, t, tokenizer, data, vocab_size)

        def forward(batch: dict[str, torch.Tensor], mask: torch.Tensor, model=model) -> torch.Tensor:
            batch = {k: v.to(device) for k, v in batch.items()}
            signal = teacher_signal(model, batch, mask.to(device), vocab_size)
            return signal.rows(0, signal.hidden.shape[0])

        splits = {"train": data.train, "validation": data.validation}
        manifest = build_cache(Path(t.cache), forward, splits, header, spec, collate, vocab_size)
        written.append((name, manifest))
        del model
    return written
