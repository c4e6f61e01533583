"""The training loop: one accelerate loop that reads top to bottom.

`train` starts the run (`start.start_run`), then steps through accumulation windows. Each window is
one optimizer step (`step.optimizer_step`); once in a while the loop logs, evaluates on the held-out
rows, saves a checkpoint, or stops on a signal after saving one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from kdistill.config import RunConfig
from kdistill.data.batches import ahead, epoch_loader, windows
from kdistill.files import RunFiles
from kdistill.prerun.flops import model_shape
from kdistill.run.export import export_student
from kdistill.run.guards import split_window
from kdistill.run.metrics import LogWindow
from kdistill.run.start import Run, start_run
from kdistill.run.step import optimizer_step
from kdistill.run.stop_signals import Interrupted, StopSignals
from kdistill.sampling.cross_samples import with_teacher_views
from kdistill.sampling.engine import VllmEngine
from kdistill.sampling.generate import generated_window, is_on_policy, requests, rows_per_call, step_seed
from kdistill.sampling.overlap import Overlap
from kdistill.storage.checkpoint import latest_checkpoint, load_checkpoint, remove_partial

log = logging.getLogger("kdistill")
Engine = VllmEngine | Overlap


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
    run = start_run(cfg, resume, overwrite, config_path)
    with run.lock:  # the folder stays this run's until it ends, however it ends
        step, epoch, skip, in_flight = _starting_point(run, resume)
        with _engine(run, step, in_flight) as engine:  # the student's vLLM engine, stopped however it ends
            step = _steps(run, step, epoch, skip, engine)
        return _finish(run, step, started)


@contextlib.contextmanager
def _engine(run: Run, step: int, in_flight: list | None) -> Iterator[Engine | None]:
    """The student's vLLM engine (`training.on_policy.engine: vllm`) holding the weights of `step`;
    with `overlap`, wrapped to sample a step ahead, with the rows a checkpoint kept in flight
    (`in_flight`, one entry per process) put back."""
    if run.engine is None:
        yield None
        return
    student = run.accelerator.unwrap_model(run.model).model
    args = (run.engine, run.out / RunFiles.ENGINE, student, run.parts.tokenizer, step, run.accelerator)
    with VllmEngine(*args) as engine:
        if not run.engine.overlap:
            yield engine
            return
        with Overlap(engine) as overlap:
            if in_flight and len(in_flight) == run.accelerator.num_processes:
                overlap.restore(in_flight[run.accelerator.process_index])
            yield overlap


def _steps(run: Run, step: int, epoch: int, skip: int, engine: Engine | None = None) -> int:
    """Optimizer steps from `step` (`skip` windows into `epoch`) to the last; returns the last step."""
    cfg, t, accelerator, parts, held_out, total = (
        run.cfg, run.cfg.training, run.accelerator, run.parts, run.held_out, run.total_steps
    )  # fmt: skip
    # FLOP/s in the metrics: the student's and the live teachers' shapes; a cache costs no FLOPs.
    runs = cfg.loss.alpha > 0 or cfg.loss.hidden.weight > 0  # else the step never calls the teachers
    live = [model_shape(m) for x in parts.teachers if runs for m in x.local_models()]
    window_log = LogWindow(model_shape(parts.student), live)
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
                stats = run.backoff.run(
                    lambda w, s=step + 1, u=upcoming: _generate_and_step(run, w, s, engine, u),
                    window,
                    step + 1,
                )
                run.scheduler.step()
                step += 1
                bar.update(1)
                if run.monitor.after_step(step, stats, run.guarded.skipped):
                    window_log.add(stats)
                # Once in a while: log, evaluate, checkpoint; on a signal, checkpoint and stop.
                if (step % t.logging_steps == 0 or step == total) and window_log.sums["trained"]:
                    progress = epoch + (index + 1) / run.windows_per_epoch
                    record = window_log.flush(accelerator, run.scheduler.get_last_lr()[0], progress)
                    run.metrics.write(step, {**record, **run.monitor.on_log(record)})
                    bar.set_postfix(_postfix(record))
                if t.eval_steps and step % t.eval_steps == 0 and step < total:
                    held_out.evaluate(step)
                signum = stop.requested(held_out.agree) if step < total else None
                if signum or (t.save_steps and step % t.save_steps == 0 and step < total):
                    checkpoint = run.save(step, epoch, index + 1, _in_flight(run, engine))
                if signum:
                    accelerator.end_training()  # trackers flush what they hold
                    raise Interrupted(signum, step, checkpoint)
                if step >= total:
                    break
            epoch, skip = epoch + 1, 0
    return step


def _generate_and_step(
    run: Run,
    window: list[dict[str, Any]],
    step: int,
    engine: Engine | None = None,
    upcoming: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """One optimizer step; on an on-policy step the student first writes the window's responses
    (in process, or on `engine`). With `overlap`, the engine is sent the rows of the next step
    (`upcoming`) before this one trains.

    Both run inside the out-of-memory back-off: a generation that runs out of memory is retried, with
    the step, on the window cut into smaller micro-batches (each writes for its own rows).
    """
    window, generated = _on_policy(run, window, step, engine)
    stats = {}
    if isinstance(engine, Overlap) and upcoming is not None:
        began = time.perf_counter()
        _send_ahead(run, upcoming, step + 1, engine)  # syncs first when the next rows need it
        stats["gen_sync_seconds"] = generated.get("gen_sync_seconds", 0.0) + time.perf_counter() - began
    return {**_step(run, window, bool(generated)), **generated, **stats}


def _step(run: Run, window: list[dict[str, Any]], generated: bool = False) -> dict[str, float]:
    """One optimizer step over `window` (the out-of-memory back-off may have cut it finer).

    On a window the student wrote (`generated`), only live teachers score it (a cache cannot) and
    there is no CE term; `sampled` mode swaps the divergence for the policy-gradient estimate.
    """
    max_norm, teachers, settings = run.cfg.training.max_grad_norm, run.parts.teachers, run.settings
    if generated:
        live = [x for x in teachers if x.grades_samples]
        share = sum(x.weight for x in live)  # the live teachers share the whole weight
        teachers = [replace(x, weight=x.weight / share) for x in live]
        settings = replace(settings, ce=False)
        if run.cfg.training.on_policy.mode == "sampled":
            settings = replace(settings, divergence="sampled_reverse_kl", divergence_kwargs={})
    return optimizer_step(run.accelerator, run.model, teachers, window, settings, run.guarded, max_norm)


def _on_policy(
    run: Run, window: list[dict[str, Any]], step: int, engine: Engine | None
) -> tuple[list[dict[str, Any]], dict]:
    """`window` with the student's own responses on an on-policy step (and the generation's sums).

    With the vLLM engine, the engine is first brought to the current weights when they are
    `sync_steps` steps ahead of its own; the step logs how far behind it samples (`gen_staleness`).
    """
    seed = run.cfg.training.seed
    if run.sampling is None or not is_on_policy(run.sampling.lmbda, seed, step):
        return window, {}
    student = run.accelerator.unwrap_model(run.model).model
    synced = {}
    if engine is not None:
        began = time.perf_counter()
        engine.maybe_sync(student, step)
        seconds = time.perf_counter() - began
        synced = {"gen_steps": 1, "gen_staleness": engine.staleness(step), "gen_sync_seconds": seconds}
    # The samples differ per step and per batch; each process writes for its own rows.
    process = (run.accelerator.process_index, run.accelerator.num_processes)
    group = rows_per_call(run.sampling.generation_batch_size, run.cfg.training.batch_size, run.backoff.micro)
    written, sums = generated_window(
        student, window, run.sampling, run.collator, step_seed(seed, step), process, engine, group
    )
    if isinstance(engine, Overlap):  # the engine's time the step did not wait for
        synced["gen_hidden_seconds"] = max(0.0, engine.engine_seconds - sums["gen_seconds"])
    if run.parts.teacher_tokenizers:  # teachers of another tokenizer read each response re-aligned
        longest = run.cfg.data.max_length + run.sampling.max_new_tokens
        args = (
            run.parts.data.train,
            run.parts.tokenizer,
            run.parts.teacher_tokenizers,
            longest,
            run.collator,
        )
        written = with_teacher_views(window, written, *args)
    return written, {**sums, **synced}


def _send_ahead(run: Run, upcoming: list[dict[str, Any]], step: int, engine: Overlap) -> None:
    """Send the engine the rows step `step` will ask for (its window cut as the back-off cuts it)."""
    seed = run.cfg.training.seed
    if run.sampling is None or not is_on_policy(run.sampling.lmbda, seed, step):
        return
    student = run.accelerator.unwrap_model(run.model).model
    process = (run.accelerator.process_index, run.accelerator.num_processes)
    cut = split_window(upcoming, run.backoff.micro)
    batches, seeds = requests(cut, run.sampling, step_seed(seed, step), process)
    engine.send(student, step, batches, run.sampling, seeds)


def _in_flight(run: Run, engine: Engine | None) -> dict[str, Any]:
    """For a checkpoint: every process's rows in flight on an overlapping engine (gathered on all)."""
    if not isinstance(engine, Overlap):
        return {}
    return {"in_flight": gather_object([engine.state()])}


def _starting_point(run: Run, resume: bool) -> tuple[int, int, int, list | None]:
    """`(step, epoch, window, in_flight)` to start from: the newest checkpoint's on --resume, else
    zeros, after measuring the held-out quality before training."""
    folder = run.out / RunFiles.CHECKPOINTS
    checkpoint = latest_checkpoint(folder) if resume else None
    if resume and run.accelerator.is_main_process:
        remove_partial(folder)
    if checkpoint is not None:
        args = (run.accelerator, run.model, run.optimizer, run.scheduler, run.projections())
        state = load_checkpoint(checkpoint, *args)
        run.held_out.before = state["before"]
        if run.cfg.training.micro_batch_size is None:  # keep what out-of-memory back-off found
            run.backoff.micro = state.get("micro_batch_size", run.backoff.micro)
        run.metrics.truncate_after(state["step"])
        log.info("resumed from %s (step %d)", checkpoint, state["step"])
        return state["step"], state["epoch"], state["window"], state.get("in_flight")
    if resume:
        log.warning("--resume: no checkpoint in %s; starting from step 0", folder)
        run.metrics.truncate_after(-1)
    before = run.held_out.before = run.held_out.evaluate(0)
    if "kl" in before:
        log.info("before training: held-out KL to teacher %.4f, perplexity %.2f", before["kl"], before["ppl"])
    return 0, 0, 0, None


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
        str(run.out), step, seconds, len(data.train), len(data.validation), data.dropped, before, after
    )
    if accelerator.is_main_process:
        (run.out / RunFiles.SUMMARY).write_text(json.dumps(summary.__dict__, indent=2))
    accelerator.wait_for_everyone()  # no process may tear down the process group while the main one writes
    accelerator.end_training()
    return summary


def _postfix(record: dict[str, float]) -> dict[str, str]:
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
    return postfix
