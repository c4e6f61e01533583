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
from kdistill.files import RunFiles
from kdistill.losses.hidden import HiddenProjections
from kdistill.models.build import build_student, full_precision, load_teacher
from kdistill.models.parts import base_model, copied_layers, depth_and_width
from kdistill.models.prune.calibration import load_calibration
from kdistill.prerun.preflight import hidden_pairs, run_checks
from kdistill.storage.checkpoint import latest_checkpoint
from kdistill.storage.resume_config import HISTORY
from kdistill.teacher.base import Teacher
from kdistill.teacher.responses import load_data
from kdistill.teacher.roster import build_teachers, compact_teachers, load_live_teachers

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
    teacher_tokenizers: dict[str, Any] = field(default_factory=dict)  # the same teachers' tokenizers


def build_components(
    cfg: RunConfig, device: torch.device, config_path: str = "CONFIG", accelerator: Any = None
) -> Components:
    """Make validate's checks (`prerun/preflight.py`, launched as `accelerator` is), then load the
    models (a pruned student calibrated on the training rows), the data and any teacher caches."""
    checked = run_checks(cfg, accelerator=accelerator)  # every refusal that needs no weights, first
    vocabs = checked.vocabs
    calibration = load_calibration(cfg, vocabs.tokenizer)
    student, live = load_student_and_teachers(cfg, device, calibration)
    first_name = cfg.teacher_list()[0][0]
    compact_teachers(cfg, live)  # after the student has copied any teacher layers
    data = load_data(cfg, vocabs.tokenizer, live.get(first_name), vocabs.cross, ready=checked.data)
    return Components(
        teachers=build_teachers(cfg, live, vocabs, data, config_path),
        student=student,
        tokenizer=vocabs.tokenizer,
        data=data,
        vocab_size=vocabs.width,
        projections=build_projections(cfg, live, student, device),
        teacher_pads={name: tok.pad_token_id for name, tok in vocabs.cross.items()},
        teacher_tokenizers=vocabs.cross,
    )


def load_student_and_teachers(
    cfg: RunConfig, device: torch.device, calibration: list[dict[str, torch.Tensor]] | None = None
) -> tuple[Any, dict[str, Any]]:
    """The student and the live teachers.

    A `from_teacher` student copies the first teacher's layers: as loaded when it runs live in full
    precision, else from its full-precision weights loaded only for that. Quantized layers cannot be
    copied, so for a bitsandbytes teacher those weights are dropped before the quantized teacher loads.
    """
    first_name, first = cfg.teacher_list()[0]
    copies = cfg.student.from_teacher is not None  # with the teacher's model: `student_from_teacher` checked
    if copies and first.quantization != "none":
        student = build_student(cfg.student, load_teacher(full_precision(first), device), device, calibration)
        return student, load_live_teachers(cfg, device)
    live = load_live_teachers(cfg, device)
    base = live.get(first_name)
    if copies and base is None:
        base = load_teacher(first, device)  # only to copy its layers; it teaches from elsewhere
    return build_student(cfg.student, base, device, calibration), live


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
        for name, pairs in hidden_pairs(cfg, shapes, own, copied_layers(student))
    ]


# What a run that stopped before its first checkpoint leaves (a crash while loading, a refused step):
# nothing of it can be resumed, so the next plain `train` may take the folder over.
_LEFTOVERS = {RunFiles.CONFIG, RunFiles.METRICS, RunFiles.ENGINE, RunFiles.LOCK, HISTORY, "logs"}


def _contents(out: Path) -> list[Path]:
    """What `out` holds besides the run's own lock file."""
    return [p for p in out.iterdir() if p.name != RunFiles.LOCK] if out.is_dir() else []


def no_step_saved(out: Path) -> bool:
    """Whether `out` holds only what a run leaves that stopped before its first checkpoint (and is
    not empty): no checkpoint, no student."""
    found = _contents(out)
    empty = lambda p: p.name == RunFiles.CHECKPOINTS and latest_checkpoint(p) is None  # noqa: E731
    return bool(found) and all(p.name in _LEFTOVERS or empty(p) for p in found)


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty run folder unless asked to resume or overwrite; changes nothing.

    The run's own lock file (`RunFiles.LOCK`) does not count; nor does a folder left by a run that
    stopped before its first checkpoint, which the run then takes over (`prepare_output_dir`).
    """
    if out.exists() and not out.is_dir():
        raise KdistillError(f"output_dir {out} exists and is not a folder")
    if _contents(out) and not (resume or overwrite or no_step_saved(out)):
        raise KdistillError(
            f"output_dir {out} is not empty; pass --resume to continue that run or --overwrite to replace it"
        )


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, main: bool) -> None:
    """Check the run folder (`check_output_dir`), then on the main process empty it for `--overwrite`
    or for a run that takes over a folder in which no step was saved (`--overwrite` keeps the lock)."""
    check_output_dir(out, resume, overwrite)
    if main and not resume and (overwrite or no_step_saved(out)):
        if not overwrite:
            log.info("output_dir %s: no step of the run that left it was saved; starting it afresh", out)
        for path in _contents(out):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    if main:
        out.mkdir(parents=True, exist_ok=True)
