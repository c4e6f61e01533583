"""Everything one training run holds from its first step to its last, built in a fixed order."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_cosine_schedule_with_warmup

from kdistill.config import RunConfig, save_config
from kdistill.data import Collator
from kdistill.files import RunFiles
from kdistill.models.build import checkpoint_student
from kdistill.objective.batch import StudentLoss
from kdistill.objective.settings import loss_settings
from kdistill.run.accelerator import flat_hparams, mixed_precision, whole_models
from kdistill.run.budget import TimeBudget, budget_schedule
from kdistill.run.components import Components, build_components, check_output_dir, prepare_output_dir
from kdistill.run.guards import OomBackoff, SkipNonFinite, oom_advice
from kdistill.run.health import HealthMonitor, build_health
from kdistill.run.held_out import HeldOut
from kdistill.run.lean import lean_student
from kdistill.run.metrics import MetricsFile
from kdistill.run.optimizer import adamw, param_groups
from kdistill.run.step import Step
from kdistill.sampling.base import OnPolicyParts, Sampler
from kdistill.sampling.cross_samples import TeacherViews
from kdistill.sampling.settings import build_sampler, engine_settings, sampling_settings
from kdistill.storage.checkpoint import check_writable, latest_checkpoint, save_checkpoint
from kdistill.storage.folder_lock import FolderLock, lock_run_folder
from kdistill.storage.resume_config import check_resume_config


@dataclass
class Run:
    """One training run: its config and folder, the prepared model and optimizer, and its guards.

    `model` is the prepared `StudentLoss`; `optimizer` the prepared optimizer, which the step uses
    through the NaN guard (`guards.SkipNonFinite`) and checkpoints save as it is. `step` is one
    optimizer step (`step.Step`), which the out-of-memory back-off (`backoff`) calls; `sampler` gives
    each step its rows (the student's own on an on-policy step).
    """

    cfg: RunConfig
    out: Path
    accelerator: Accelerator
    parts: Components
    model: Any
    optimizer: Any
    scheduler: Any
    collator: Collator
    metrics: MetricsFile
    held_out: HeldOut
    backoff: OomBackoff
    monitor: HealthMonitor
    total_steps: int
    budget: TimeBudget  # training.max_minutes: the training seconds spent and the limit
    windows_per_epoch: int
    lock: FolderLock  # one run per folder: held until the run ends
    sampler: Sampler
    step: Step

    def projections(self) -> list[tuple[str, Any]]:
        """Each teacher's name with its hidden-state projections; empty without loss.hidden."""
        return list(
            zip([t.name for t in self.parts.teachers], self.accelerator.unwrap_model(self.model).projections)
        )

    def save(self, step: int, epoch: int, window: int, extra: dict | None = None) -> Path:
        """A checkpoint after `step` (`window` windows into `epoch`, `extra` in its state); every
        process takes part."""
        state = {
            "epoch": epoch,
            "window": window,
            "before": self.held_out.before,
            "micro_batch_size": self.backoff.micro,
            "train_seconds": self.budget.seconds(),
            **(extra or {}),
        }
        folder, keep = self.out / RunFiles.CHECKPOINTS, self.cfg.training.save_total_limit
        args = (self.accelerator, self.model, self.optimizer, self.scheduler, state, keep, self.projections())
        config = yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False)
        return save_checkpoint(folder, step, *args, config=config)


def start_run(cfg: RunConfig, resume: bool, overwrite: bool, config_path: str, force: bool = False) -> Run:
    """Lock and check the folder, load models and data, and prepare the model, optimizer and guards.

    The returned run holds the folder's lock (`Run.lock`) until its caller releases it; a start
    that fails releases it here. `force` resumes with a config that changes what is trained.
    """
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=mixed_precision(cfg.training.mixed_precision),
        log_with=cfg.training.report_to or None,
        project_dir=str(out / "logs"),
    )
    set_seed(cfg.training.seed)
    main = accelerator.is_main_process
    if main:
        check_writable(out)  # before the models load: a read-only folder should not cost minutes
    # Before anything loads, is deleted or written: a second run on this folder stops here.
    lock = lock_run_folder(out, main)
    try:
        # Before the models load: a folder this start may not use, or a resumed run's changed config.
        record = _check_run_folder(cfg, out, resume, overwrite, force)
        return _build_run(cfg, out, accelerator, lock, (resume, overwrite, record), config_path)
    except BaseException:
        lock.release()
        raise


def _build_run(
    cfg: RunConfig,
    out: Path,
    accelerator: Accelerator,
    lock: FolderLock,
    start: tuple[bool, bool, Callable[[], None] | None],
    config_path: str,
) -> Run:
    """The run's parts, loaded and prepared; `start` is `(resume, overwrite, record)`, `record`
    writing a resumed run's config change into its history (`resume_config.record_change`)."""
    t = cfg.training
    with whole_models(accelerator):  # everything that can fail on bad input happens here
        parts = build_components(cfg, accelerator.device, config_path, accelerator)
    _open_run_folder(cfg, out, accelerator, *start)
    model = StudentLoss(parts.student, parts.projections)
    if t.gradient_checkpointing:
        checkpoint_student(parts.student)
    lean_student(parts.student, accelerator)  # one process: leaner gradients and activations
    optimizer = adamw(param_groups(model, t.weight_decay), t.learning_rate)
    rows_per_window = t.batch_size * accelerator.num_processes * t.gradient_accumulation_steps
    windows_per_epoch = math.ceil(len(parts.data.train) / rows_per_window)
    total_steps = t.max_steps or math.ceil(t.num_epochs * windows_per_epoch)
    # The scheduler is stepped by hand once per optimizer step; accelerate's wrapper steps it per process.
    budget = TimeBudget(t.max_minutes)  # a resumed run sets the seconds its checkpoint had spent
    if t.max_minutes is None:
        scheduler = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, total_steps)
    else:  # the decay follows the budget too (run/budget.py)
        scheduler = budget_schedule(optimizer, t.warmup_steps, total_steps, budget)
    if accelerator.state.deepspeed_plugin is not None:  # it cannot infer this without a prepared loader
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    collator = Collator(parts.tokenizer.pad_token_id, teacher_pads=parts.teacher_pads)
    metrics = MetricsFile(out / RunFiles.METRICS, accelerator)
    held_out = HeldOut(accelerator, model, parts, cfg, collator, metrics)
    advice = oom_advice(cfg.data.max_length, cfg.loss.chunk_size)
    reset = functools.partial(optimizer.zero_grad, set_to_none=True)
    backoff = OomBackoff(t.micro_batch_size or t.batch_size, accelerator.num_processes, advice, reset)
    monitor = build_health(
        t.health, cfg.loss.alpha, cfg.loss.temperature, bool(parts.teachers), held_out.reduce
    )
    sampler = _sampler(cfg, out, accelerator, model, parts, collator, backoff)
    step = Step(
        accelerator=accelerator,
        model=model,
        teachers=parts.teachers,
        settings=loss_settings(cfg, parts.vocab_size),
        sampler=sampler,
        optimizer=SkipNonFinite(optimizer, held_out.reduce),
        max_grad_norm=t.max_grad_norm,
        sampled_mode=t.on_policy.mode == "sampled",
    )
    return Run(
        cfg=cfg, out=out, accelerator=accelerator, parts=parts, model=model, optimizer=optimizer,
        scheduler=scheduler, collator=collator, metrics=metrics, held_out=held_out, backoff=backoff,
        monitor=monitor, total_steps=total_steps, budget=budget, windows_per_epoch=windows_per_epoch,
        lock=lock, sampler=sampler, step=step,
    )  # fmt: skip


def _sampler(
    cfg: RunConfig,
    out: Path,
    accelerator: Accelerator,
    model: Any,
    parts: Components,
    collator: Collator,
    backoff: OomBackoff,
) -> Sampler:
    """What gives each step its rows (`training.on_policy`): a pass-through while it is off."""
    sampling = sampling_settings(cfg, parts.tokenizer)
    views = TeacherViews(
        train=parts.data.train,
        tokenizer=parts.tokenizer,
        teachers=parts.teacher_tokenizers,  # teachers of another tokenizer read each response re-aligned
        max_length=cfg.data.max_length + sampling.max_new_tokens,
    )
    on_policy = OnPolicyParts(
        sampling=sampling,
        student=accelerator.unwrap_model(model).model,
        collator=collator,
        seed=cfg.training.seed,
        process=(accelerator.process_index, accelerator.num_processes),
        views=views,
    )
    return build_sampler(
        on_policy,
        engine_settings(cfg),
        batch_size=cfg.training.batch_size,
        micro=lambda: backoff.micro,  # the out-of-memory back-off may lower it
        folder=out / RunFiles.ENGINE,
        tokenizer=parts.tokenizer,
        processes=accelerator,
    )


def _check_run_folder(
    cfg: RunConfig, out: Path, resume: bool, overwrite: bool, force: bool
) -> Callable[[], None] | None:
    """Refuse a folder this start may not use, or (`--resume`) a config that changes what the newest
    checkpoint's run trains, unless `force`; returns what records a kept change (or None)."""
    check_output_dir(out, resume, overwrite)
    checkpoint = latest_checkpoint(out / RunFiles.CHECKPOINTS) if resume else None
    if checkpoint is None:
        return None
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    return check_resume_config(checkpoint, step, out, cfg.model_dump(mode="json"), force)


def _open_run_folder(
    cfg: RunConfig,
    out: Path,
    accelerator: Accelerator,
    resume: bool,
    overwrite: bool,
    record: Callable[[], None] | None,
) -> None:
    """Check the run folder for this start (new, resumed, overwritten), write the config, start trackers."""
    main = accelerator.is_main_process
    prepare_output_dir(out, resume=resume, overwrite=overwrite, main=main)
    if main and record is not None:
        record()  # config_history.yaml: the config before and after, from the checkpoint's step
    # Every process checks the folder before the main one writes into it; else a slower process could
    # find the main one's config there and refuse a folder that was empty.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(cfg, out / RunFiles.CONFIG)
    if cfg.training.report_to:
        accelerator.init_trackers("kdistill", config=flat_hparams(cfg.model_dump(mode="json")))
