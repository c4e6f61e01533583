"""Everything a run needs before its first step, and `kdistill validate`.

These are the only functions below the CLI that read the config; they hand plain objects on.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdistill.config import RunConfig
from kdistill.data import DataSplits, build_datasets
from kdistill.data.responses import with_teacher_responses
from kdistill.errors import KdistillError
from kdistill.losses.hidden import (
    HiddenProjections,
    LayerPairs,
    copied_layer_pairs,
    require_live_teacher,
    resolve_layer_pairs,
)
from kdistill.models.build import build_student, keep_indices, load_teacher, student_source, teacher_source
from kdistill.models.loading import load_config_only, load_tokenizer
from kdistill.models.vocab import known_mismatch, shared_vocab_size
from kdistill.teacher.cache_format import header_mismatch, load_manifest
from kdistill.train.forward import Teacher
from kdistill.train.teachers import build_teachers, cache_header, load_live_teachers

log = logging.getLogger("kdistill")


@dataclass
class Components:
    teachers: list[Teacher]
    student: Any
    tokenizer: Any
    data: DataSplits
    vocab_size: int
    projections: list[HiddenProjections] = field(default_factory=list)  # per teacher, with loss.hidden

    @property
    def teacher(self) -> Any:
        """The first live teacher model, if any (response generation, evaluation helpers)."""
        return next((t.model for t in self.teachers if t.model is not None), None)


def build_components(cfg: RunConfig, device: torch.device, config_path: str = "CONFIG") -> Components:
    """Load tokenizers, check the vocabularies, then the models, the data and any teacher caches."""
    check_hidden_teachers(cfg)  # before anything loads: it needs no model to fail
    tokenizer, vocab_size = check_models(cfg)
    live = load_live_teachers(cfg, device)
    first_name, first = cfg.teacher_list()[0]
    base = live.get(first_name)
    if cfg.student.from_teacher is not None and base is None:
        if first.model is None:
            raise KdistillError(
                "student.from_teacher copies the teacher's layers, but the teacher has only a cache; "
                "give teacher.model beside teacher.cache"
            )
        base = load_teacher(first, device)  # only to copy its layers; the cache teaches
    student = build_student(cfg.student, base, device)
    del base
    data = load_data(cfg, tokenizer, live.get(first_name))
    teachers = build_teachers(cfg, live, tokenizer, data, vocab_size, config_path)
    projections = build_projections(cfg, live, student, device)
    return Components(teachers, student, tokenizer, data, vocab_size, projections)


def load_data(cfg: RunConfig, tokenizer: Any, teacher: Any | None) -> DataSplits:
    """The tokenized splits; with `data.responses: teacher` the (live) first teacher writes responses."""
    respond = None
    if cfg.data.responses == "teacher":
        if teacher is None:
            raise KdistillError(
                "data.responses: teacher needs a live teacher; give teacher.model without a cache"
            )

        def respond(examples: list) -> list:
            return with_teacher_responses(
                examples,
                teacher,
                tokenizer,
                teacher_id=teacher_source(cfg.teacher).identity,
                max_new_tokens=cfg.data.generation.max_new_tokens,
                batch_size=cfg.data.generation.batch_size,
            )

    data = build_datasets(cfg.data, tokenizer, cfg.training.seed, respond)
    log.info(
        "data: %d training and %d validation rows (%s format), %d dropped for length",
        len(data.train),
        len(data.validation),
        data.format,
        data.dropped,
    )
    return data


def check_models(cfg: RunConfig) -> tuple[Any, int]:
    """The student's tokenizer and the shared logit width; errors if a model cannot be found or differs.

    Every teacher with a model is checked against the student; a cache-only teacher is checked
    when its cache is opened (its manifest records the tokenizer).
    """
    named = [(name, t) for name, t in cfg.teacher_list() if t.model is not None]
    if cfg.student.model is None and not named:
        raise KdistillError("student.from_teacher needs the teacher's model; give teacher.model")
    for _, teacher in named:  # known pairs fail here, before anything is downloaded
        known = known_mismatch(teacher.model, cfg.student.model or named[0][1].model)
        if known:
            raise KdistillError(known)
    if cfg.student.model is not None:
        s_source = student_source(cfg.student)
        s_tok, s_width = load_tokenizer(s_source), _logit_width(load_config_only(s_source))
    else:  # from_teacher: the first teacher's tokenizer and head
        s_source = teacher_source(named[0][1])
        s_tok, s_width = load_tokenizer(s_source), _logit_width(load_config_only(s_source))
    width = s_width
    for name, teacher in named:
        student_name = cfg.student.model or named[0][1].model
        t_source = teacher_source(teacher)
        t_tok, t_width = load_tokenizer(t_source), _logit_width(load_config_only(t_source))
        try:
            width = min(width, shared_vocab_size(teacher.model, t_tok, t_width, student_name, s_tok, s_width))
        except KdistillError as err:
            if len(cfg.teacher_list()) == 1:
                raise
            raise KdistillError(
                f"teacher {name!r}: {err}. Several teachers must share the student's tokenizer until "
                "cross-tokenizer distillation is supported"
            ) from None
    return s_tok, width


def _logit_width(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def _shape(config: Any) -> tuple[int, int]:
    """A model config's `(decoder layers, hidden size)`."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers), int(text.hidden_size)


def check_hidden_teachers(cfg: RunConfig) -> None:
    """loss.hidden needs every teacher live: a teacher cache holds no hidden states."""
    if cfg.loss.hidden.weight > 0:
        for name, teacher in cfg.teacher_list():
            require_live_teacher(teacher.cache is not None, str(teacher.cache), name)


def hidden_pairs(
    cfg: RunConfig, teachers: dict[str, tuple[int, int]], student: tuple[int, int]
) -> list[tuple[str, LayerPairs]]:
    """Each teacher's `(teacher_layer, student_layer)` pairs for loss.hidden.

    `teachers` maps each teacher's name to its `(layers, hidden size)`, `student` is the student's.
    `auto` pairs layers at the same relative depth (`auto_layer_pairs`), except that a `from_teacher`
    student's layers pair with the layers of the first teacher they were copied from (spread evenly too,
    first and last included): each student layer starts as a copy of the teacher layer it is paired with.
    """
    layers, several = cfg.loss.hidden.layers, len(teachers) > 1
    found = []
    for index, (name, _) in enumerate(cfg.teacher_list()):
        depth = teachers[name][0]
        if layers == "auto" and index == 0 and cfg.student.from_teacher is not None:
            pairs = copied_layer_pairs(keep_indices(depth, student[0]))
        else:
            key = f"loss.hidden.layers (teacher {name!r})" if several else "loss.hidden.layers"
            pairs = resolve_layer_pairs(layers, depth, student[0], key)
        found.append((name, pairs))
    return found


def build_projections(
    cfg: RunConfig, live: dict[str, Any], student: Any, device: torch.device
) -> list[HiddenProjections]:
    """One `HiddenProjections` per teacher for loss.hidden (fp32, on `device`); none while it is off."""
    if cfg.loss.hidden.weight == 0:
        return []
    shapes = {name: _shape(model.config) for name, model in live.items()}
    base = student.get_base_model() if hasattr(student, "get_base_model") else student  # a LoRA student
    own = _shape(base.config)
    return [
        HiddenProjections(pairs, own[1], shapes[name][1]).to(device)
        for name, pairs in hidden_pairs(cfg, shapes, own)
    ]


def hidden_lines(cfg: RunConfig) -> list[str]:
    """`kdistill validate`'s lines on loss.hidden: each teacher's layer pairs and projection sizes."""
    named = cfg.teacher_list()
    shapes = {name: _shape(load_config_only(teacher_source(t))) for name, t in named}
    if cfg.student.from_teacher is not None:
        own = (cfg.student.from_teacher.num_layers, shapes[named[0][0]][1])
    else:
        own = _shape(load_config_only(student_source(cfg.student)))
    lines = []
    for name, pairs in hidden_pairs(cfg, shapes, own):
        width = shapes[name][1]
        maps = f"a {own[1]} -> {width} projection per pair" if own[1] != width else "no projection"
        lines.append(f"hidden {name}: {len(pairs)} layer pairs (teacher, student) {pairs}, {maps}")
    return lines


def validate_run(cfg: RunConfig) -> list[str]:
    """What `kdistill validate` reports: checks that need no model weights and no training."""
    check_hidden_teachers(cfg)
    tokenizer, width = check_models(cfg)
    data = build_datasets(cfg.data.model_copy(update={"responses": "dataset"}), tokenizer, cfg.training.seed)
    hidden = cfg.loss.hidden
    lines = [
        f"teacher {name}: {t.model or 'cache only'}"
        + (f" (cache {t.cache})" if t.cache else "")
        + f", weight {t.weight:g}, quantization {t.quantization}"
        for name, t in cfg.teacher_list()
    ]
    lines += [
        f"logits: {width:,} shared tokens; several teachers combine by {cfg.loss.multi_teacher}"
        if cfg.teachers and len(cfg.teachers) > 1
        else f"logits: {width:,}",
        f"student: {cfg.student.model or f'from_teacher, {cfg.student.from_teacher.num_layers} layers'} "
        f"({cfg.student.finetune})",
        f"data: {len(data.train)} training and {len(data.validation)} validation rows, format {data.format}, "
        f"{data.dropped} dropped for length",
        f"loss: {cfg.loss.alpha} * {cfg.loss.divergence} * T^2 + {1 - cfg.loss.alpha:g} * CE"
        + (f" + {hidden.weight:g} * hidden ({hidden.distance})" if hidden.weight > 0 else "")
        + f", T = {cfg.loss.temperature}",
    ]
    if hidden.weight > 0:
        lines += hidden_lines(cfg)
    if cfg.data.responses == "teacher":
        lines.append("responses: generated by the teacher at the start of training (cached)")
    lines += [
        f"teacher {name}: {cache_status(cfg, t, tokenizer, data, width)}"
        for name, t in cfg.teacher_list()
        if t.cache
    ]
    return lines


def cache_status(cfg: RunConfig, teacher: Any, tokenizer: Any, data: DataSplits, width: int) -> str:
    """One line on a teacher's cache: ready, not built, incomplete, or built for something else."""
    manifest = load_manifest(Path(teacher.cache))
    if manifest is None:
        return f"cache {teacher.cache} not built yet; run `kdistill cache` with this config"
    problem = header_mismatch(
        Path(teacher.cache), manifest["header"], cache_header(cfg, teacher, tokenizer, data, width)
    )
    if problem:
        return f"{problem}; rebuild it with `kdistill cache`"
    if not manifest["complete"]:
        return f"cache {teacher.cache} is incomplete; run `kdistill cache` again to finish it"
    tokens = sum(split["tokens"] for split in manifest["splits"].values())
    return f"cache {teacher.cache} matches this config ({tokens:,} trained tokens)"


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, main: bool) -> None:
    """Refuse to write into a non-empty run folder unless asked to resume or overwrite."""
    if out.exists() and not out.is_dir():
        raise KdistillError(f"output_dir {out} exists and is not a folder")
    busy = out.exists() and any(out.iterdir())
    if busy and not (resume or overwrite):
        raise KdistillError(
            f"output_dir {out} is not empty; pass --resume to continue that run or --overwrite to replace it"
        )
    if main and busy and overwrite and not resume:
        shutil.rmtree(out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
