"""The teachers of a run as the step sees them: each live, cached or served (`base.Teacher`), with its weight.

These functions read the config; the `Teacher`s they return are plain.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from kdistill.config import RunConfig, TeacherConfig
from kdistill.data import DataSplits
from kdistill.errors import KdistillError
from kdistill.models.build import load_teacher, teacher_source
from kdistill.models.compact import compact_frozen
from kdistill.teacher.base import Teacher
from kdistill.teacher.cache import CachedTeacher, TeacherCache
from kdistill.teacher.cache_build import CacheSpec
from kdistill.teacher.live import LiveTeacher
from kdistill.teacher.packing import rows_fingerprint, tokenizer_fingerprint
from kdistill.teacher.served import ServedTeacher, ServerClient, ServerSettings
from kdistill.teacher.vocabularies import Vocabularies, check_cross_options

log = logging.getLogger("kdistill")


def teacher_kind(teacher: TeacherConfig) -> type[Teacher]:
    """The kind of teacher a config section gives, known before anything loads: a cache is read when
    given (a `model` beside it only names the weights a `from_teacher` student copies), a server is
    asked when given, else the model runs live."""
    if teacher.cache is not None:
        return CachedTeacher
    return ServedTeacher if teacher.server else LiveTeacher


def cache_command(config_path: str) -> str:
    return f"kdistill cache {config_path}"


def cache_header(
    cfg: RunConfig,
    teacher: TeacherConfig | None,
    vocabs: Vocabularies,
    data: DataSplits,
    name: str | None = None,
) -> dict[str, Any]:
    """What a cache records about how it was built, and what training checks it against.

    A teacher of another tokenizer also records that tokenizer (`teacher_tokenizer`) and its own
    logit width; the fingerprints stay those of the student's rows, which its stored alignment indexes.
    """
    d = cfg.data
    tokenizer, cross = vocabs.tokenizer, name in vocabs.cross
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
        "vocab_size": vocabs.cross_width[name] if cross else vocabs.width,
        "teacher_tokenizer": tokenizer_fingerprint(vocabs.cross[name]) if cross else None,
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
    """Every teacher that runs here, loaded; the others (caches, servers) load no model at all."""
    return {name: load_teacher(t, device) for name, t in cfg.teacher_list() if teacher_kind(t).runs_here}


def served_teacher(cfg: RunConfig, teacher: TeacherConfig, name: str) -> ServerClient:
    """The client of a served teacher; its top k is the cache's (`cache.top_k`)."""
    urls = tuple(teacher.server or ())
    model = teacher.served_name or name
    return ServerClient(
        ServerSettings(urls, model, cfg.cache.top_k, retries=teacher.retries, backoff=teacher.retry_backoff)
    )


def compact_teacher(name: str, teacher: TeacherConfig, model: nn.Module) -> None:
    """`teacher.compact`: the model's exactly-compactable weights stored compactly, in place.

    Call it once nothing copies the teacher's weights any more (`student.from_teacher` does). A
    bitsandbytes teacher (`teacher.quantization`) is left as it is: its layers are compact already.
    """
    if teacher.compact and teacher.quantization == "none":
        report = compact_frozen(model)
        if report.q4_blocks or report.bf16:
            log.info("teacher %s: %s", name, report.describe())


def compact_teachers(cfg: RunConfig, live: dict[str, nn.Module]) -> None:
    """`compact_teacher` for every live teacher of the run."""
    for name, t in cfg.teacher_list():
        if name in live:
            compact_teacher(name, t, live[name])


def build_teachers(
    cfg: RunConfig,
    live: dict[str, nn.Module],
    vocabs: Vocabularies,
    data: DataSplits,
    config_path: str,
) -> list[Teacher]:
    """The run's teachers with normalised weights; caches are opened and checked against the config.

    A teacher of another tokenizer gets its vocabulary map: built from both tokenizers for a live
    one, read from its cache (where `kdistill cache` stored it) for a cached one.
    """
    named = cfg.teacher_list()
    total = sum(t.weight for _, t in named)
    teachers = [
        _teacher(cfg, name, t, t.weight / total, live, vocabs, data, config_path) for name, t in named
    ]
    check_cross_options(cfg, [t.name for t in teachers if t.mapping is not None])
    return teachers


def _teacher(
    cfg: RunConfig,
    name: str,
    t: TeacherConfig,
    weight: float,
    live: dict[str, nn.Module],
    vocabs: Vocabularies,
    data: DataSplits,
    config_path: str,
) -> Teacher:
    """One teacher of the run, of the kind its section gives (`teacher_kind`)."""
    kind, cross = teacher_kind(t), name in vocabs.cross  # a cache-only teacher's tokenizer is in its cache
    if kind is ServedTeacher:
        client = checked_server(cfg, t, name, cross, vocabs.tokenizer, data)
        return ServedTeacher(name=name, weight=weight, client=client)
    if kind is LiveTeacher:
        mapping = vocabs.mapping(name) if cross else None
        return LiveTeacher(name=name, weight=weight, model=live[name], mapping=mapping)
    cache = TeacherCache.open(t.cache, cache_header(cfg, t, vocabs, data, name), cache_command(config_path))
    if t.model is not None and cross != cache.aligned:
        built, now = ("another", "the same") if cache.aligned else ("the same", "another")
        raise KdistillError(
            f"teacher cache {t.cache} was built for a teacher with {built} tokenizer as the "
            f"student's, but teacher {name!r} now has {now} one; rebuild it with "
            f"`{cache_command(config_path)}`"
        )
    # An aligned cache stores its vocabulary map (`kdistill cache`): no need to build it again.
    mapping = cache.vocab_map() if cache.aligned else vocabs.mapping(name) if cross else None
    return CachedTeacher(name=name, weight=weight, cache=cache, mapping=mapping)


def checked_server(
    cfg: RunConfig, teacher: TeacherConfig, name: str, cross: bool, tokenizer: Any, data: DataSplits
) -> ServerClient:
    """A served teacher's client, after checking the servers against the first training rows."""
    if cross:
        raise KdistillError(
            f"teacher {name!r} is served and uses another tokenizer than the student: a served teacher is "
            "read at the student's token positions, so it must share the student's tokenizer; run it in "
            "process (remove teacher.server) instead"
        )
    server = served_teacher(cfg, teacher, name)
    server.check([row.input_ids for row in data.train[:4]], tokenizer)
    return server
