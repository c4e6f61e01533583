"""The training loop: one accelerate loop that reads top to bottom.

`train` starts the run (`start.start_run`), then steps through accumulation windows. Each window is
one optimizer step (`run.step`, a `step.Step`, called through the out-of-memory back-off), which
takes its rows from the run's sampler (`sampling.base`). Once in a while the loop logs, evaluates on
the held-out rows, saves a checkpoint, or stops on a signal after saving one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from kdistill.config import RunConfig
from kdistill.data.batches import ahead, epoch_loader, windows
from kdistill.errors import ServerUnreachable
from kdistill.files import RunFiles
from kdistill.prerun.flops import model_shape
from kdistill.run.export import export_student
from kdistill.run.metrics import LogWindow, RetryCount
from kdistill.run.start import Run, start_run
from kdistill.run.stop_signals import Interrupted, StopSignals
from kdistill.storage.checkpoint import kept_checkpoint, latest_checkpoint, load_checkpoint, remove_partial

log = logging.getLogger("kdistill")


@dataclass
class RunSummary:
    output_dir: str
    steps: int
    seconds: float
    train_rows: int
    validation_rows: int
    dropped_rows: int
    train_seconds: float  # inside the training loop, over every resumed part (training.max_minutes)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)


def train(
    cfg: RunConfig,
    resume: bool = False,
    overwrite: bool = False,
    config_path: str = "CONFIG",
    force: bool = False,
) -> RunSummary:
    """Distil the student described by `cfg` and write it to `cfg.output_dir`.

    `config_path` only names the config in messages (such as how to build a missing teacher cache);
    `force` resumes with a config that changes what is trained (`storage/resume_config.py`).
    """
    started = time.perf_counter()
    run = start_run(cfg, resume, overwrite, config_path, force)
    with run.lock:  # the folder stays this run's until it ends, however it ends
        try:
            step, epoch, skip, saved = _starting_point(run, resume)
            run.sampler.restore(saved)  # a checkpoint's step and rows in flight (an engine's)
            with run.sampler:  # the student's vLLM engine, if any, stopped however the run ends
                step = _steps(run, step, epoch, skip)
                run.budget.stop()  # the measurements and the export after training are not training time
            return _finish(run, step, started)
        except ServerUnreachable as err:  # a served teacher failed every retry: say what is kept
            kept = kept_checkpoint(run.out / RunFiles.CHECKPOINTS, "make sure the teacher's server answers")
            raise ServerUnreachable(f"{err}. {kept}") from None


def _steps(run: Run, step: int, epoch: int, skip: int) -> int:
    """Optimizer steps from `step` (`skip` windows into `epoch`) to the last; returns the last step."""
    cfg, t, accelerator, parts, held_out, total = (
        run.cfg, run.cfg.training, run.accelerator, run.parts, run.held_out, run.total_steps
    )  # fmt: skip
    # FLOP/s in the metrics: the student's and the live teachers' shapes; a cache costs no FLOPs.
    runs = cfg.loss.alpha > 0 or cfg.loss.hidden.weight > 0  # else the step never calls the teachers
    live = [model_shape(m) for x in parts.teachers if runs for m in x.local_models()]
    window_log = LogWindow(model_shape(parts.student), live)
    retries = RetryCount(parts.teachers, any(x.server for _, x in cfg.teacher_list()))
    budget = run.budget  # training.max_minutes
    budget.start()
    if budget.exhausted(held_out.agree):  # resumed from the checkpoint written at the budget
        log.info("training.max_minutes=%g already spent: no step to run (raise it to go on)", t.max_minutes)
        return step
    bar = tqdm(
        total=total, initial=step, desc="distill", unit="step", disable=not accelerator.is_main_process
    )
    # SIGINT/SIGTERM: finish the step, checkpoint, exit (see stop_signals.py); the bar closes on any exit.
    with StopSignals() as stop, bar:
        while step < total:
            loader = accelerator.prepare(
                epoch_loader(parts.data.train, t.batch_size, t.seed, epoch, run.collator)
            )
            for index, (window, upcoming) in enumerate(ahead(windows(loader, t.gradient_accumulation_steps))):
                if index < skip:
                    continue  # already trained before the checkpoint we resumed from
                upcoming = upcoming if step + 1 < total else None  # the next step's window, if it runs
                stats = run.backoff.run(run.step, window, step + 1, upcoming)
                run.scheduler.step()
                step += 1
                bar.update(1)
                if run.monitor.after_step(step, stats, run.step.optimizer.skipped):
                    window_log.add({**stats, **retries.since_last()})
                # training.max_minutes: a checkpoint at the budget, so --resume with more minutes goes on.
                timed_out = step < total and budget.exhausted(held_out.agree)
                # Once in a while: log, evaluate, checkpoint; on a signal, checkpoint and stop.
                if (step % t.logging_steps == 0 or step == total or timed_out) and window_log.sums["trained"]:
                    progress = epoch + (index + 1) / run.windows_per_epoch
                    record = window_log.flush(accelerator, run.scheduler.get_last_lr()[0], progress)
                    run.metrics.write(step, {**record, **run.monitor.on_log(record)})
                    bar.set_postfix(_postfix(record, retries.total))
                if t.eval_steps and step % t.eval_steps == 0 and step < total:
                    held_out.evaluate(step)
                signum = stop.requested(held_out.agree) if step < total else None
                if signum or timed_out or (t.save_steps and step % t.save_steps == 0 and step < total):
                    checkpoint = run.save(step, epoch, index + 1, run.sampler.state())
                if signum:
                    accelerator.end_training()  # trackers flush what they hold
                    raise Interrupted(signum, step, checkpoint)
                if timed_out:
                    log.info("training.max_minutes=%g reached at step %d", t.max_minutes, step)
                    return step
                if step >= total:
                    break
            epoch, skip = epoch + 1, 0
    return step


def _starting_point(run: Run, resume: bool) -> tuple[int, int, int, dict[str, Any]]:
    """`(step, epoch, window, state)` to start from: the newest checkpoint's on --resume (`state`, what
    it kept), else zeros and no state, after measuring the held-out quality before training."""
    folder = run.out / RunFiles.CHECKPOINTS
    checkpoint = latest_checkpoint(folder) if resume else None
    if resume and run.accelerator.is_main_process:
        remove_partial(folder)
    if checkpoint is not None:
        args = (run.accelerator, run.model, run.optimizer, run.scheduler, run.projections())
        state = load_checkpoint(checkpoint, *args)
        run.held_out.before = state["before"]
        run.budget.spent_before = state.get("train_seconds", 0.0)
        if run.cfg.training.micro_batch_size is None:  # keep what out-of-memory back-off found
            run.backoff.micro = state.get("micro_batch_size", run.backoff.micro)
        run.metrics.truncate_after(state["step"])
        log.info("resumed from %s (step %d)", checkpoint, state["step"])
        return state["step"], state["epoch"], state["window"], state
    if resume:
        log.warning("--resume: no checkpoint in %s; starting from step 0", folder)
        run.metrics.truncate_after(-1)
    before = run.held_out.before = run.held_out.evaluate(0)
    if "kl" in before:
        log.info("before training: held-out KL to teacher %.4f, perplexity %.2f", before["kl"], before["ppl"])
    return 0, 0, 0, {}


def _finish(run: Run, step: int, started: float) -> RunSummary:
    """Measure the held-out quality after training, export the student and write the summary."""
    accelerator, parts, before = run.accelerator, run.parts, run.held_out.before
    after = run.held_out.evaluate(step)
    run.monitor.check_quality(before, after)
    accelerator.wait_for_everyone()
    # Every process calls it: the student's weights are gathered from all of them, the main one writes.
    export_student(accelerator, run.model, parts.tokenizer, run.out, run.cfg.student.merge, run.projections())
    data, seconds = parts.data, time.perf_counter() - started
    summary = RunSummary(
        str(run.out), step, seconds, len(data.train), len(data.validation), data.dropped,
        run.budget.seconds(), before, after,
    )  # fmt: skip
    if accelerator.is_main_process:
        (run.out / RunFiles.SUMMARY).write_text(json.dumps(summary.__dict__, indent=2))
    accelerator.wait_for_everyone()  # no process may tear down the process group while the main one writes
    accelerator.end_training()
    return summary


def _postfix(record: dict[str, float], retries: int) -> dict[str, str]:
    postfix = {
        "loss": f"{record['loss']:.3f}",
        "kd": f"{record['loss/kd']:.3f}",
        "ce": f"{record['loss/ce']:.3f}",
        "tok_s": f"{record['tokens_per_s']:.0f}",
    }
    if "gen/tokens_per_s" in record:  # on-policy steps: generation speed and its share of the time
        postfix["gen_tok_s"] = f"{record['gen/tokens_per_s']:.0f}"
        postfix["gen_share"] = f"{record['gen/time_share']:.0%}"
    if "gen/staleness" in record:  # the vLLM engine: how many steps its weights lag behind
        postfix["stale"] = f"{record['gen/staleness']:.1f}"
    if retries:  # served teachers: their requests retried since the run started
        postfix["retries"] = str(retries)
    return postfix
