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
from kdistill.data import IGNORE_INDEX, DataSplits, build_datasets
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
from kdistill.models.loading import hub_reachable, load_config_only
from kdistill.teacher.cache_format import header_mismatch, load_manifest
from kdistill.train.forward import Teacher
from kdistill.train.teachers import build_teachers, cache_header, compact_teachers, load_live_teachers
from kdistill.train.vocabs import Vocabularies, check_cross_options, check_vocabularies, known_alignment

log = logging.getLogger("kdistill")


@dataclass
class Components:
    teachers: list[Teacher]
    student: Any
    tokenizer: Any
    data: DataSplits
    vocab_size: int
    projections: list[HiddenProjections] = field(default_factory=list)  # per teacher, with loss.hidden
    teacher_pads: dict[str, int] = field(default_factory=dict)  # pad ids of teachers of another tokenizer

    @property
    def teacher(self) -> Any:
        """The first live teacher model, if any (response generation, evaluation helpers)."""
        return next((t.model for t in self.teachers if t.model is not None), None)


def build_components(cfg: RunConfig, device: torch.device, config_path: str = "CONFIG") -> Components:
    """Load tokenizers, check the vocabularies, then the models, the data and any teacher caches."""
    check_hidden_teachers(cfg)  # before anything loads: it needs no model to fail
    vocabs = check_vocabularies(cfg)
    tokenizer, vocab_size = vocabs.tokenizer, vocabs.width
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
    compact_teachers(cfg, live)  # after the student has copied any teacher layers
    data = load_data(cfg, tokenizer, live.get(first_name), vocabs.cross)
    teachers = build_teachers(cfg, live, vocabs, data, config_path)
    projections = build_projections(cfg, live, student, device)
    pads = {name: tok.pad_token_id for name, tok in vocabs.cross.items()}
    return Components(teachers, student, tokenizer, data, vocab_size, projections, pads)


def load_data(
    cfg: RunConfig, tokenizer: Any, teacher: Any | None, cross: dict[str, Any] | None = None
) -> DataSplits:
    """The tokenized splits; with `data.responses: teacher` the (live) first teacher writes responses.

    `cross` names the teachers with another tokenizer (name -> tokenizer): rows get their views.
    """
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

    data = build_datasets(cfg.data, tokenizer, cfg.training.seed, respond, cross)
    log.info(
        "data: %d training and %d validation rows (%s format), %d dropped for length",
        len(data.train),
        len(data.validation),
        data.format,
        data.dropped,
    )
    return data


def check_models(cfg: RunConfig) -> tuple[Any, int]:
    """The student's tokenizer and the logit width shared with same-vocabulary teachers."""
    vocabs = check_vocabularies(cfg)
    return vocabs.tokenizer, vocabs.width


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
    """What `kdistill validate` reports: checks that need no model weights and no training.

    Without access to the hub, a config naming hub models kdistill knows (such as the seed recipe's)
    is still checked: its keys, and from kdistill's table of known models, whether and how the
    vocabularies are aligned. The lines say what could not be loaded.
    """
    check_hidden_teachers(cfg)
    try:
        vocabs = check_vocabularies(cfg)
    except KdistillError as err:
        known = known_alignment(cfg)
        if hub_reachable() or not known:
            raise
        check_cross_options(cfg, [name for name, line in known.items() if "loss.alignment" in line])
        return [
            *_config_lines(cfg, None),
            *known.values(),
            f"not checked here, as the hub cannot be reached: {err}",
        ]
    tokenizer = vocabs.tokenizer
    data = build_datasets(
        cfg.data.model_copy(update={"responses": "dataset"}), tokenizer, cfg.training.seed, None, vocabs.cross
    )
    lines = _config_lines(cfg, vocabs.width)
    lines.append(
        f"data: {len(data.train)} training and {len(data.validation)} validation rows, format {data.format}, "
        f"{data.dropped} dropped for length"
    )
    lines += alignment_lines(cfg, vocabs, data)
    if cfg.loss.hidden.weight > 0:
        lines += hidden_lines(cfg)
    if cfg.data.responses == "teacher":
        lines.append("responses: generated by the teacher at the start of training (cached)")
    lines += [
        f"teacher {name}: {cache_status(cfg, t, vocabs, data, name)}"
        for name, t in cfg.teacher_list()
        if t.cache
    ]
    return lines


def _config_lines(cfg: RunConfig, width: int | None) -> list[str]:
    """The teachers, the student and the loss as the config states them (`width`: shared logits)."""
    hidden = cfg.loss.hidden
    lines = [
        f"teacher {name}: {t.model or 'cache only'}"
        + (f" (cache {t.cache})" if t.cache else "")
        + f", weight {t.weight:g}, quantization {t.quantization}"
        for name, t in cfg.teacher_list()
    ]
    if width is not None:
        several = cfg.teachers and len(cfg.teachers) > 1
        lines.append(
            f"logits: {width:,} shared tokens; several teachers combine by {cfg.loss.multi_teacher}"
            if several
            else f"logits: {width:,}"
        )
    return lines + [
        f"student: {cfg.student.model or f'from_teacher, {cfg.student.from_teacher.num_layers} layers'} "
        f"({cfg.student.finetune})",
        f"loss: {cfg.loss.alpha} * {cfg.loss.divergence} * T^2 + {1 - cfg.loss.alpha:g} * CE"
        + (f" + {hidden.weight:g} * hidden ({hidden.distance})" if hidden.weight > 0 else "")
        + f", T = {cfg.loss.temperature}",
    ]


def alignment_lines(cfg: RunConfig, vocabs: Vocabularies, data: DataSplits) -> list[str]:
    """Per teacher of another tokenizer: the alignment used and how much of the data it covers."""
    lines = []
    for name, tok in vocabs.cross.items():
        views = [row.views[name] for row in data.train if row.views]
        pairs = sum(len(v.student_pos) for v in views)
        single = sum(sum(v.one_to_one) for v in views)
        trained = sum(sum(label != IGNORE_INDEX for label in row.labels[1:]) for row in data.train)
        mapping = vocabs.mapping(name)
        how = (
            "mapped KL on one-to-one segments, ULD elsewhere"
            if cfg.loss.alignment == "span"
            else "ULD everywhere"
        )
        lines.append(
            f"teacher {name}: another tokenizer ({len(tok):,} tokens against the student's "
            f"{len(vocabs.tokenizer):,}); loss.alignment {cfg.loss.alignment}: {how}; "
            f"{len(mapping):,} teacher tokens map to student tokens; {pairs:,} aligned pairs for "
            f"{trained:,} trained student tokens ({single / max(pairs, 1):.0%} one-to-one)"
        )
    return lines


def cache_status(cfg: RunConfig, teacher: Any, vocabs: Vocabularies, data: DataSplits, name: str) -> str:
    """One line on a teacher's cache: ready, not built, incomplete, or built for something else."""
    manifest = load_manifest(Path(teacher.cache))
    if manifest is None:
        return f"cache {teacher.cache} not built yet; run `kdistill cache` with this config"
    problem = header_mismatch(
        Path(teacher.cache), manifest["header"], cache_header(cfg, teacher, vocabs, data, name)
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
