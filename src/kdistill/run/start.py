"""Everything one training run holds from its first step to its last, built in a fixed order."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_cosine_schedule_with_warmup

from kdistill.config import RunConfig, save_config
from kdistill.data import Collator
from kdistill.errors import KdistillError
from kdistill.files import RunFiles
from kdistill.models.build import checkpoint_student
from kdistill.objective.batch import LossSettings, StudentLoss
from kdistill.objective.settings import loss_settings
from kdistill.run.accelerator import flat_hparams, mixed_precision, sharded_weights, whole_models
from kdistill.run.components import Components, build_components, prepare_output_dir
from kdistill.run.guards import OomBackoff, SkipNonFinite, oom_advice
from kdistill.run.health import HealthMonitor, build_health
from kdistill.run.held_out import HeldOut
from kdistill.run.lean import lean_student
from kdistill.run.metrics import MetricsFile
from kdistill.run.optimizer import adamw, param_groups
from kdistill.sampling.engine import EngineSettings
from kdistill.sampling.generate import Sampling
from kdistill.sampling.settings import engine_settings, sampling_settings
from kdistill.storage.checkpoint import check_resume_config, check_writable, save_checkpoint
from kdistill.storage.folder_lock import FolderLock, lock_run_folder


@dataclass
class Run:
    """One training run: its config and folder, the prepared model and optimizer, and its guards.

    `model` is the prepared `StudentLoss`; `optimizer` the prepared optimizer, which the step uses
    through `guarded` (the NaN guard) and checkpoints save as it is.
    """

    cfg: RunConfig
    out: Path
    accelerator: Accelerator
    parts: Components
    settings: LossSettings
    model: Any
    optimizer: Any
    guarded: SkipNonFinite
    scheduler: Any
    collator: Collator
    metrics: MetricsFile
    held_out: HeldOut
    backoff: OomBackoff
    monitor: HealthMonitor
    total_steps: int
    windows_per_epoch: int
    lock: FolderLock  # one run per folder: held until the run ends
    sampling: Sampling | None = None  # training.on_policy: how the student writes its responses
    engine: EngineSettings | None = None  # training.on_policy.engine vllm: where the student samples

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
            **(extra or {}),
        }
        folder, keep = self.out / RunFiles.CHECKPOINTS, self.cfg.training.save_total_limit
        args = (self.accelerator, self.model, self.optimizer, self.scheduler, state, keep, self.projections())
        return save_checkpoint(folder, step, *args)


def start_run(cfg: RunConfig, resume: bool, overwrite: bool, config_path: str) -> Run:
    """Lock and check the folder, load models and data, and prepare the model, optimizer and guards.

    The returned run holds the folder's lock (`Run.lock`) until its caller releases it; a start
    that fails releases it here.
    """
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=mixed_precision(cfg.training.mixed_precision),
        log_with=cfg.training.report_to or None,
        project_dir=str(out / "logs"),
    )
    set_seed(cfg.training.seed)
    main = accelerator.is_main_process
    _check_engine_processes(cfg, accelerator)
    if main:
        check_writable(out)  # before the models load: a read-only folder should not cost minutes
    # Before anything loads, is deleted or written: a second run on this folder stops here.
    lock = lock_run_folder(out, main)
    try:
        return _build_run(cfg, out, accelerator, lock, resume, overwrite, config_path)
    except BaseException:
        lock.release()
        raise


def _check_engine_processes(cfg: RunConfig, accelerator: Accelerator) -> None:
    """The vLLM engine is synced from the main process's copy of the student: it must be whole there."""
    engine = cfg.training.on_policy.engine.kind == "vllm" and cfg.training.on_policy.lmbda > 0
    if engine and accelerator.num_processes > 1 and sharded_weights(accelerator):
        raise KdistillError(
            f"training.on_policy.engine=vllm with {accelerator.num_processes} processes under "
            f"{accelerator.distributed_type.value}: the engine is synced from the main process's copy of "
            "the student, which FSDP and ZeRO-3 shard; use DDP or ZeRO-1/2, or engine: hf"
        )


def _build_run(
    cfg: RunConfig,
    out: Path,
    accelerator: Accelerator,
    lock: FolderLock,
    resume: bool,
    overwrite: bool,
    config_path: str,
) -> Run:
    t = cfg.training
    with whole_models(accelerator):  # everything that can fail on bad input happens here
        parts = build_components(cfg, accelerator.device, config_path)
    _open_run_folder(cfg, out, accelerator, resume, overwrite)
    model = StudentLoss(parts.student, parts.projections)
    if t.gradient_checkpointing:
        checkpoint_student(parts.student)
    lean_student(parts.student, accelerator)  # one process: leaner gradients and activations
    optimizer = adamw(param_groups(model, t.weight_decay), t.learning_rate)
    rows_per_window = t.batch_size * accelerator.num_processes * t.gradient_accumulation_steps
    windows_per_epoch = math.ceil(len(parts.data.train) / rows_per_window)
    total_steps = t.max_steps or math.ceil(t.num_epochs * windows_per_epoch)
    # The scheduler is stepped by hand once per optimizer step; accelerate's wrapper steps it per process.
    scheduler = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, total_steps)
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
    guarded = SkipNonFinite(optimizer, held_out.reduce)
    settings = loss_settings(cfg, parts.vocab_size)
    sampling, engine = sampling_settings(cfg, parts.tokenizer), engine_settings(cfg)
    return Run(
        cfg, out, accelerator, parts, settings, model, optimizer, guarded, scheduler, collator, metrics,
        held_out, backoff, monitor, total_steps, windows_per_epoch, lock, sampling, engine,
    )  # fmt: skip


def _open_run_folder(
    cfg: RunConfig, out: Path, accelerator: Accelerator, resume: bool, overwrite: bool
) -> None:
    """Check the run folder for this start (new, resumed, overwritten), write the config, start trackers."""
    prepare_output_dir(out, resume=resume, overwrite=overwrite, main=accelerator.is_main_process)
    if resume:
        check_resume_config(out / RunFiles.CONFIG, cfg.model_dump(mode="json"))
    # Every process checks the folder before the main one writes into it; else a slower process could
    # find the main one's config there and refuse a folder that was empty.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(cfg, out / RunFiles.CONFIG)
    if cfg.training.report_to:
        accelerator.init_trackers("kdistill", config=flat_hparams(cfg.model_dump(mode="json")))
