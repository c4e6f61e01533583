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
from kdistill.models.parts import base_model, depth_and_width
from kdistill.objective.batch import LossSettings
from kdistill.run.engine import EngineSettings
from kdistill.run.generate import Sampling
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
    teacher_tokenizers: dict[str, Any] = field(default_factory=dict)  # the same teachers' tokenizers


def build_components(cfg: RunConfig, device: torch.device, config_path: str = "CONFIG") -> Components:
    """Make validate's checks (`run/preflight.py`), then load the models, the data and any teacher caches."""
    check_on_policy(cfg)  # needs nothing loaded
    plan = run_checks(cfg)  # every refusal that needs no weights, before any weight loads
    vocabs = plan.vocabs
    check_on_policy_vocabularies(cfg, vocabs.cross)
    tokenizer, vocab_size = vocabs.tokenizer, vocabs.width
    student, live = load_student_and_teachers(cfg, device)
    first_name = cfg.teacher_list()[0][0]
    compact_teachers(cfg, live)  # after the student has copied any teacher layers
    data = load_data(cfg, tokenizer, live.get(first_name), vocabs.cross, ready=plan.data)
    teachers = build_teachers(cfg, live, vocabs, data, config_path)
    projections = build_projections(cfg, live, student, device)
    pads = {name: tok.pad_token_id for name, tok in vocabs.cross.items()}
    return Components(teachers, student, tokenizer, data, vocab_size, projections, pads, vocabs.cross)


def load_student_and_teachers(cfg: RunConfig, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The student and the live teachers.

    A `from_teacher` student copies the first teacher's layers: as loaded when it runs live in full
    precision, else from its full-precision weights loaded only for that. Quantized layers cannot be
    copied, so for a bitsandbytes teacher those weights are dropped before the quantized teacher loads.
    """
    first_name, first = cfg.teacher_list()[0]
    copies = cfg.student.from_teacher is not None
    if copies and first.model is None:
        raise KdistillError(
            "student.from_teacher copies the teacher's layers, but the teacher has only a cache; "
            "give teacher.model beside teacher.cache"
        )
    if copies and first.quantization != "none":
        student = build_student(cfg.student, load_teacher(full_precision(first), device), device)
        return student, load_live_teachers(cfg, device)
    live = load_live_teachers(cfg, device)
    base = live.get(first_name)
    if copies and base is None:
        base = load_teacher(first, device)  # only to copy its layers; it teaches from elsewhere
    return build_student(cfg.student, base, device), live


def check_on_policy(cfg: RunConfig) -> None:
    """On-policy steps need a live teacher: a cache holds only the sequences it was built from."""
    lmbda = cfg.training.on_policy.lmbda
    if lmbda == 0:
        return
    cached = [name for name, t in cfg.teacher_list() if t.cache is not None]
    if len(cached) == len(cfg.teacher_list()):
        raise KdistillError(
            f"training.on_policy.lmbda={lmbda:g} trains on responses the student writes during training, "
            "but every teacher is a cache, which can only score the sequences it was built from; give a "
            "live teacher (teacher.model without teacher.cache) or set training.on_policy.lmbda: 0"
        )
    if cached and lmbda == 1:
        raise KdistillError(
            f"training.on_policy.lmbda=1 leaves no step for the cached teacher(s) {', '.join(cached)} "
            "(a cache cannot score the student's own responses, and only off-policy steps read it); "
            "use lmbda < 1 or remove those teachers"
        )
    served = [name for name, t in cfg.teacher_list() if t.server]
    if served and cfg.training.on_policy.mode == "sampled" and cfg.loss.temperature != 1.0:
        raise KdistillError(
            f"training.on_policy.mode=sampled with the served teacher(s) {', '.join(served)} needs "
            f"loss.temperature: 1 (got {cfg.loss.temperature:g}): a server gives each sampled token's "
            "log-prob at T = 1, and a tempered one needs the whole distribution; set loss.temperature: 1 "
            "or mode: divergence"
        )
    if cfg.loss.alpha == 0:
        raise KdistillError(
            "training.on_policy.lmbda > 0 with loss.alpha=0: a generated batch has no CE term, so it would "
            "train nothing; set loss.alpha > 0"
        )


def check_on_policy_vocabularies(cfg: RunConfig, cross: dict[str, Any]) -> None:
    """`sampled` mode reads the teacher's log-prob of each token the student sampled, which a teacher of
    another tokenizer does not have (it reads other tokens); `divergence` mode re-aligns each response."""
    on = cfg.training.on_policy
    if on.lmbda > 0 and on.mode == "sampled" and cross:
        raise KdistillError(
            "training.on_policy.mode=sampled with teacher(s) of another tokenizer "
            f"({', '.join(sorted(cross))}): that mode needs the teacher's log-prob of each token the "
            "student sampled, and such a teacher reads the response as other tokens; use mode: divergence "
            "(each response is re-aligned to the teacher's tokens) or same-tokenizer teachers"
        )


def sampling_settings(cfg: RunConfig, tokenizer: Any) -> Sampling | None:
    """`training.on_policy`'s generation settings as plain values; None while it is off."""
    o = cfg.training.on_policy
    if o.lmbda == 0:
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Sampling(
        o.lmbda, o.max_new_tokens, o.temperature, o.top_p, o.max_prompt_length, tokenizer.eos_token_id, pad,
        generation_batch_size(cfg),
    )  # fmt: skip


def generation_batch_size(cfg: RunConfig) -> int:
    """Rows per generate call at the configured micro-batch: `training.on_policy.generation_batch_size`,
    by default the step's rows on the process (batch_size x gradient_accumulation_steps)."""
    t = cfg.training
    return t.on_policy.generation_batch_size or t.batch_size * t.gradient_accumulation_steps


def engine_settings(cfg: RunConfig) -> EngineSettings | None:
    """`training.on_policy.vllm` as plain values when the student samples on vLLM; None otherwise."""
    o = cfg.training.on_policy
    if o.lmbda == 0 or o.engine != "vllm":
        return None
    v = o.vllm
    length = o.max_prompt_length + o.max_new_tokens  # the longest sequence the engine holds
    return EngineSettings(
        v.python, v.server, v.served_name, v.memory, v.start_timeout, o.sync_steps, length, o.overlap,
        v.devices,
    )  # fmt: skip


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
    """Refuse to write into a non-empty run folder unless asked to resume or overwrite.

    The run's own lock file (`RunFiles.LOCK`) does not count, and `--overwrite` keeps it.
    """
    if out.exists() and not out.is_dir():
        raise KdistillError(f"output_dir {out} exists and is not a folder")
    found = [p for p in out.iterdir() if p.name != RunFiles.LOCK] if out.exists() else []
    if found and not (resume or overwrite):
        raise KdistillError(
            f"output_dir {out} is not empty; pass --resume to continue that run or --overwrite to replace it"
        )
    if main and overwrite and not resume:
        for path in found:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
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
