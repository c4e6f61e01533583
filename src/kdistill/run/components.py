"""Everything a run builds before its first step: models, data, teachers, projections, loss settings.

These functions read the config; they hand plain objects on.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdistill.config import RunConfig
from kdistill.data import DataSplits
from kdistill.errors import KdistillError
from kdistill.losses.hidden import HiddenProjections
from kdistill.models.build import build_student, load_teacher
from kdistill.models.parts import base_model, depth_and_width
from kdistill.objective.batch import LossSettings
from kdistill.run.preflight import hidden_pairs, run_checks
from kdistill.teacher.responses import load_data
from kdistill.teacher.roster import Teacher, build_teachers, compact_teachers, load_live_teachers

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


def build_components(cfg: RunConfig, device: torch.device, config_path: str = "CONFIG") -> Components:
    """Make validate's checks (`run/preflight.py`), then load the models, the data and any teacher caches."""
    plan = run_checks(cfg)  # every refusal that needs no weights, before any weight loads
    vocabs = plan.vocabs
    tokenizer, vocab_size = vocabs.tokenizer, vocabs.width
    live = load_live_teachers(cfg, device)
    first_name, first = cfg.teacher_list()[0]
    base = live.get(first_name)
    if cfg.student.from_teacher is not None and base is None:
        base = load_teacher(first, device)  # only to copy its layers; the cache teaches
    student = build_student(cfg.student, base, device)
    del base
    compact_teachers(cfg, live)  # after the student has copied any teacher layers
    data = load_data(cfg, tokenizer, live.get(first_name), vocabs.cross, ready=plan.data)
    teachers = build_teachers(cfg, live, vocabs, data, config_path)
    projections = build_projections(cfg, live, student, device)
    pads = {name: tok.pad_token_id for name, tok in vocabs.cross.items()}
    return Components(teachers, student, tokenizer, data, vocab_size, projections, pads)


def build_projections(
    cfg: RunConfig, live: dict[str, Any], student: Any, device: torch.device
) -> list[HiddenProjections]:
    """One `HiddenProjections` per teacher for loss.hidden (fp32, on `device`); none while it is off."""
    if cfg.loss.hidden.weight == 0:
        return []
    shapes = {name: depth_and_width(model.config) for name, model in live.items()}
    own = depth_and_width(base_model(student).config)
    return [
        HiddenProjections(pairs, own[1], shapes[name][1]).to(device)
        for name, pairs in hidden_pairs(cfg, shapes, own)
    ]


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


def loss_settings(cfg: RunConfig, vocab_size: int | None) -> LossSettings:
    """The loss's plain values from `cfg.loss`, with the logit width the heads share."""
    loss = cfg.loss
    params = {
        "jsd": {"beta": loss.beta},
        "skew_kl": {"skew": loss.skew},
        "skew_reverse_kl": {"skew": loss.skew},
    }
    return LossSettings(
        alpha=loss.alpha,
        temperature=loss.temperature,
        divergence=loss.divergence,
        divergence_kwargs=params.get(loss.divergence, {}),
        chunk_size=loss.chunk_size,
        vocab_size=vocab_size,
        multi_teacher=loss.multi_teacher,
        hidden_weight=loss.hidden.weight,
        hidden_distance=loss.hidden.distance,
        alignment=loss.alignment,
    )
