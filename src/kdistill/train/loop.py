"""The training loop: one accelerate loop that reads top to bottom.

Gradient accumulation is done by hand rather than with `accelerator.accumulate`, because the loss
is normalised by the number of trained tokens in the whole accumulation window (across
processes), not per micro-batch: a window's micro-batches may hold very different numbers of
response tokens, and averaging per micro-batch would weight short responses more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from kdistill.config import RunConfig, save_config
from kdistill.data import Collator
from kdistill.eval.quality import held_out_quality, shard_batches
from kdistill.train.batches import epoch_loader, windows
from kdistill.train.batches import length_grouped_batches as length_grouped_batches  # tests import it here
from kdistill.train.checkpoint import (
    check_resume_config,
    check_writable,
    latest_checkpoint,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
)
from kdistill.train.export import export_student
from kdistill.train.flops import attention_pairs, model_shape
from kdistill.train.forward import LossSettings, StepSums, StudentHidden, Teacher, batch_loss, trained_rows
from kdistill.train.guards import OomBackoff, SkipNonFinite, build_health, oom_advice
from kdistill.train.metrics import LogWindow, MetricsFile
from kdistill.train.prepare import (
    adamw,
    flat_hparams,
    lean_student,
    mixed_precision,
    param_groups,
    single_process,
    whole_models,
)
from kdistill.train.setup import build_components, prepare_output_dir
from kdistill.train.signals import Interrupted, StopSignals

log = logging.getLogger("kdistill")


@dataclass
class RunSummary:
    output_dir: str
    steps: int
    seconds: float
    train_rows: int
    validation_rows: int
    dropped_rows: int
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)


def train(
    cfg: RunConfig, resume: bool = False, overwrite: bool = False, config_path: str = "CONFIG"
) -> RunSummary:
    """Distil the student described by `cfg` and write it to `cfg.output_dir`.

    `config_path` only names the config in messages (such as how to build a missing teacher cache).
    """
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    t = cfg.training
    accelerator = Accelerator(
        mixed_precision=mixed_precision(t.mixed_precision),
        log_with=t.report_to or None,
        project_dir=str(out / "logs"),
    )
    set_seed(t.seed)
    if accelerator.is_main_process:
        check_writable(out)  # before the models load: a read-only folder should not cost minutes
    with whole_models(accelerator):  # everything that can fail on bad input happens here
        parts = build_components(cfg, accelerator.device, config_path)
    prepare_output_dir(out, resume=resume, overwrite=overwrite, main=accelerator.is_main_process)
    if resume:
        check_resume_config(out / "kdistill_config.yaml", cfg.model_dump(mode="json"))
    # Every process checks the folder before the main one writes into it; else a slower process could
    # find the main one's config there and refuse a folder that was empty.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(cfg, out / "kdistill_config.yaml")
    if t.report_to:
        accelerator.init_trackers("kdistill", config=flat_hparams(cfg.model_dump(mode="json")))

    settings = LossSettings(
        alpha=cfg.loss.alpha,
        temperature=cfg.loss.temperature,
        divergence=cfg.loss.divergence,
        divergence_kwargs=_divergence_kwargs(cfg),
        chunk_size=cfg.loss.chunk_size,
        vocab_size=parts.vocab_size,
        multi_teacher=cfg.loss.multi_teacher,
        hidden_weight=cfg.loss.hidden.weight,
        hidden_distance=cfg.loss.hidden.distance,
        alignment=cfg.loss.alignment,
    )
    # The hidden-state projections (none without loss.hidden) are part of the student module: prepared,
    # synced, clipped and stepped with it, after its own weights in the optimizer.
    student = StudentHidden(parts.student, parts.projections)
    lean_student(parts.student, accelerator)  # one process: leaner gradients and activations
    optimizer = adamw(param_groups(student, t.weight_decay), t.learning_rate)
    world = accelerator.num_processes
    batches_per_epoch = math.ceil(len(parts.data.train) / (t.batch_size * world))
    windows_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps)
    total_steps = t.max_steps or math.ceil(t.num_epochs * windows_per_epoch)
    # The scheduler is stepped by hand once per optimizer step; accelerate's wrapper steps it per process.
    scheduler = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, total_steps)
    if accelerator.state.deepspeed_plugin is not None:  # it cannot infer this without a prepared loader
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
    student, optimizer = accelerator.prepare(student, optimizer)
    collator = Collator(parts.tokenizer.pad_token_id, teacher_pads=parts.teacher_pads)
    # Validation rows sorted by length: the padding of an evaluation pass is then close to none.
    validation = sorted(parts.data.validation, key=lambda x: len(x.input_ids))
    size = t.eval_batch_size or t.batch_size
    eval_batches, eval_counted = shard_batches(
        [collator(validation[i : i + size]) for i in range(0, len(validation), size)],
        accelerator.process_index,
        world,
    )
    metrics = MetricsFile(out / "metrics.jsonl", accelerator)
    teacher_on_validation: dict[int, object] = {}  # small: hidden states at response rows only
    # Sums over processes, so that every normalisation and every guard's decision is the same everywhere.
    reduce = (lambda x: accelerator.reduce(x.to(accelerator.device), "sum")) if world > 1 else None
    agree = (lambda x: accelerator.gather(x.to(accelerator.device)).max()) if world > 1 else None
    guarded = SkipNonFinite(optimizer, reduce)
    backoff = OomBackoff(
        t.micro_batch_size or t.batch_size,
        world,
        oom_advice(cfg.data.max_length, cfg.loss.chunk_size),
        reset=lambda: optimizer.zero_grad(set_to_none=True),
    )
    monitor = build_health(t.health, cfg.loss.alpha, cfg.loss.temperature, bool(parts.teachers), reduce)

    def evaluate(step: int) -> dict[str, float]:
        batches = ({k: v.to(accelerator.device) for k, v in b.items()} for b in eval_batches)
        result = held_out_quality(
            student,
            parts.teachers,
            batches,
            cfg.loss.chunk_size,
            parts.vocab_size,
            teacher_on_validation,
            reduce=reduce,
            counted=eval_counted,
            alignment=cfg.loss.alignment,
        )
        metrics.write(step, {f"eval/{k}": v for k, v in result.items()})
        return result

    step, epoch, skip, before = 0, 0, 0, {}
    checkpoint = latest_checkpoint(out / "checkpoints") if resume else None
    if resume and accelerator.is_main_process:
        remove_partial(out / "checkpoints")
    if checkpoint is not None:
        hidden = _named_projections(accelerator.unwrap_model(student), parts.teachers)
        state = load_checkpoint(checkpoint, accelerator, student, optimizer, scheduler, hidden)
        step, epoch, skip, before = state["step"], state["epoch"], state["window"], state["before"]
        if t.micro_batch_size is None:  # keep what out-of-memory back-off found, unless the config says
            backoff.micro = state.get("micro_batch_size", backoff.micro)
        metrics.truncate_after(step)
        log.info("resumed from %s (step %d)", checkpoint, step)
    else:
        if resume:
            log.warning("--resume: no checkpoint in %s; starting from step 0", out / "checkpoints")
            metrics.truncate_after(-1)
        before = evaluate(0)
        if "kl" in before:
            kl, ppl = before["kl"], before["ppl"]
            log.info("before training: held-out KL to teacher %.4f, perplexity %.2f", kl, ppl)

    bar = tqdm(
        total=total_steps, initial=step, desc="distill", unit="step", disable=not accelerator.is_main_process
    )
    # FLOP/s in the metrics (issue #7): the student's and the live teachers' shapes; a cache costs no FLOPs.
    live = [model_shape(x.model) for x in parts.teachers if x.model is not None]
    runs = cfg.loss.alpha > 0 or cfg.loss.hidden.weight > 0  # else batch_loss never calls the teachers
    window_log = LogWindow(model_shape(parts.student), live if runs else [])

    def run_step(window: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        return _optimizer_step(
            accelerator, student, parts.teachers, window, settings, guarded, t.max_grad_norm
        )

    def save(step: int, epoch: int, window: int) -> Path:
        state = {"epoch": epoch, "window": window, "before": before, "micro_batch_size": backoff.micro}
        hidden = _named_projections(accelerator.unwrap_model(student), parts.teachers)
        # Every process takes part (FSDP and DeepSpeed hold shards); only the main one writes files.
        folder, keep = out / "checkpoints", t.save_total_limit
        return save_checkpoint(folder, step, accelerator, student, optimizer, scheduler, state, keep, hidden)

    # SIGINT/SIGTERM: finish the step, checkpoint, exit (see signals.py); the bar closes on any exit.
    with StopSignals() as stop, bar:
        while step < total_steps:
            loader = accelerator.prepare(
                epoch_loader(parts.data.train, t.batch_size, t.seed, epoch, collator)
            )
            for index, window in enumerate(windows(loader, t.gradient_accumulation_steps)):
                if index < skip:
                    continue  # already trained before the checkpoint we resumed from
                stats = backoff.run(run_step, window, step + 1)
                scheduler.step()
                step += 1
                if monitor.after_step(step, stats, guarded.skipped):
                    window_log.add(stats)
                bar.update(1)
                if (step % t.logging_steps == 0 or step == total_steps) and window_log.sums["trained"]:
                    record = window_log.flush(
                        accelerator, scheduler.get_last_lr()[0], epoch + (index + 1) / windows_per_epoch
                    )
                    metrics.write(step, {**record, **monitor.on_log(record)})
                    bar.set_postfix(
                        loss=f"{record['loss']:.3f}",
                        kd=f"{record['loss/kd']:.3f}",
                        ce=f"{record['loss/ce']:.3f}",
                        tok_s=f"{record['tokens_per_s']:.0f}",
                    )
                if t.eval_steps and step % t.eval_steps == 0 and step < total_steps:
                    evaluate(step)
                signum = stop.requested(agree) if step < total_steps else None
                if signum or (t.save_steps and step % t.save_steps == 0 and step < total_steps):
                    checkpoint = save(step, epoch, index + 1)
                if signum:
                    accelerator.end_training()  # trackers flush what they hold
                    raise Interrupted(signum, step, checkpoint)
                if step >= total_steps:
                    break
            epoch, skip = epoch + 1, 0

    after = evaluate(step)
    monitor.check_quality(before, after)
    accelerator.wait_for_everyone()
    # Every process calls it: the student's weights are gathered from all of them, the main one writes.
    hidden = _named_projections(accelerator.unwrap_model(student), parts.teachers)  # saved beside it
    export_student(accelerator, student, parts.tokenizer, out, cfg.student.merge, hidden)
    summary = RunSummary(
        str(out),
        step,
        time.perf_counter() - started,
        len(parts.data.train),
        len(parts.data.validation),
        parts.data.dropped,
        before,
        after,
    )
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary.__dict__, indent=2))
        from kdistill.eval.report import report_after_training

        report_after_training(out)  # report.md / report.html: config, loss curves, tables
    accelerator.wait_for_everyone()  # no process may tear down the process group while the main one writes
    accelerator.end_training()
    return summary


def _optimizer_step(
    accelerator: Accelerator,
    student: torch.nn.Module,
    teachers: list[Teacher],
    window: list[dict[str, torch.Tensor]],
    settings: LossSettings,
    optimizer: Any,
    max_grad_norm: float | None,
) -> dict[str, float]:
    """Forward and backward over one accumulation window, then one optimizer step."""
    local = sum(int(trained_rows(b["labels"])[1].numel()) for b in window)
    trained = accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum").item()
    # DDP averages gradients over processes, so scale by their number to get a sum over all tokens / trained.
    scale = accelerator.num_processes / max(trained, 1)
    # One process: the head's gradient goes straight into its .grad (no second (V, H) buffer beside it).
    direct = scale if single_process(accelerator) else None
    totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "trained": local, "tokens": 0, "pairs": 0}
    # The longest micro-batch first: its activations then peak before any gradient exists; later ones
    # hold the gradients beside smaller activations (the same sums, added in another order).
    window = sorted(window, key=lambda b: -b["input_ids"].numel())
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(student)
        # DeepSpeed steps its optimizer inside backward when this flag is set: only on the last one.
        accelerator.sync_gradients = last
        with sync, accelerator.autocast():
            sums, _ = batch_loss(student, teachers, batch, settings, head_grad_scale=direct)
            accelerator.backward(sums.total * scale)
        totals["loss"] += float(sums.total.detach())
        totals["kd"] += float(sums.kd)
        totals["ce"] += float(sums.ce)
        if sums.kd_parts is not None:
            for teacher, part in zip(teachers, sums.kd_parts.tolist()):
                totals[f"kd/{teacher.name}"] = totals.get(f"kd/{teacher.name}", 0.0) + part
        if isinstance(sums, StepSums):  # loss.hidden: the teacher-weighted sum, and each teacher's own
            totals["hidden"] = totals.get("hidden", 0.0) + float(sums.hidden)
            each = sums.hidden_parts.tolist() if len(teachers) > 1 else []
            for teacher, part in zip(teachers, each):
                totals[f"hidden/{teacher.name}"] = totals.get(f"hidden/{teacher.name}", 0.0) + part
        totals["tokens"] += int(batch["attention_mask"].sum())
        totals["pairs"] += attention_pairs(batch["attention_mask"])  # for flops_per_s (train/flops.py)
    if max_grad_norm is not None:
        totals["grad_norm"] = float(accelerator.clip_grad_norm_(student.parameters(), max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def _named_projections(student: StudentHidden, teachers: list[Teacher]) -> list[tuple[str, Any]]:
    """Each teacher's name with its hidden-state projections; empty without loss.hidden."""
    return list(zip([t.name for t in teachers], student.projections))


def _divergence_kwargs(cfg: RunConfig) -> dict[str, float]:
    return {
        "jsd": {"beta": cfg.loss.beta},
        "skew_kl": {"skew": cfg.loss.skew},
        "skew_reverse_kl": {"skew": cfg.loss.skew},
    }.get(cfg.loss.divergence, {})
