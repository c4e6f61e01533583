"""Everything a run needs before its first step, and `kdistill validate`.

These are the only functions below the CLI that read the config; they hand plain objects on.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdistill.config import RunConfig
from kdistill.data import DataSplits, build_datasets
from kdistill.data.responses import with_teacher_responses
from kdistill.errors import KdistillError
from kdistill.models.build import build_student, load_teacher, student_source, teacher_source
from kdistill.models.loading import load_config_only, load_tokenizer
from kdistill.models.vocab import known_mismatch, shared_vocab_size
from kdistill.train.forward import Teacher
from kdistill.train.teachers import build_teachers, load_live_teachers

log = logging.getLogger("kdistill")


@dataclass
class Components:
    teachers: list[Teacher]
    student: Any
    tokenizer: Any
    data: DataSplits
    vocab_size: int

    @property
    def teacher(self) -> Any:
        """The first live teacher model, if any (response generation, evaluation helpers)."""
        return next((t.model for t in self.teachers if t.model is not None), None)


def build_components(cfg: RunConfig, device: torch.device, config_path: str = "CONFIG") -> Components:
    """Load tokenizers, check the vocabularies, then the models, the data and any teacher caches."""
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
    return Components(teachers, student, tokenizer, data, vocab_size)


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


def validate_run(cfg: RunConfig) -> list[str]:
    """What `kdistill validate` reports: checks that need no model weights and no training."""
    tokenizer, width = check_models(cfg)
    data = build_datasets(cfg.data.model_copy(update={"responses": "dataset"}), tokenizer, cfg.training.seed)
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
        f"loss: {cfg.loss.alpha} * {cfg.loss.divergence} * T^2 + {1 - cfg.loss.alpha:g} * CE, "
        f"T = {cfg.loss.temperature}",
    ]
    if cfg.data.responses == "teacher":
        lines.append("responses: generated by the teacher at the start of training (cached)")
    return lines


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
