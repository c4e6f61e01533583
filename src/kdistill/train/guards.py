"""Guards that keep a long run alive, or stop it with the guide's advice.

- Out of memory: the micro-batch is halved (twice the micro-batches per optimizer step, so the
  effective batch and the token normalisation are unchanged) and the same step is retried on the
  same rows.
- NaN or infinite gradients: the optimizer update is skipped; several such steps in a row stop the run.
- Health: a loss that stops falling or explodes, KD and CE parts of very different scales, and a
  held-out score that barely moved each log a warning with the troubleshooting advice.

Everything here takes plain values; `build_health` is the one function that reads the config.
"""

from __future__ import annotations

import gc
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from kdistill.errors import KdistillError

log = logging.getLogger("kdistill")

LOSS_ADVICE = (
    "lower training.learning_rate (to 1e-5), raise training.warmup_steps, and check the data format "
    "(`kdistill validate CONFIG` shows the format that was detected and how many rows were read)"
)
QUALITY_ADVICE = (
    "train longer (training.num_epochs or training.max_steps), raise loss.temperature to 4-5, "
    "and use more or better data"
)
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over processes


class GuardStop(KdistillError):
    """A guard stopped the run (out of memory at micro-batch 1, NaN losses in a row)."""

    exit_code = 3  # the command line's exit status: the input was fine, the run was not


def is_out_of_memory(err: BaseException) -> bool:
    """True for an allocation failure on any device, whatever exception type the backend raised."""
    if isinstance(err, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err).lower() for text in _OOM_TEXT)


def oom_advice(max_length: int, chunk_size: int | None) -> str:
    return (
        f"To fit: shorten data.max_length (now {max_length}); on a GPU train in bf16 "
        "(training.mixed_precision: bf16); load the teacher in 4 bits (teacher.quantization: 4bit); "
        "run the teacher once with `kdistill cache` and train from it (teacher: {cache: PATH}); "
        f"or use a smaller loss chunk (loss.chunk_size, now {chunk_size})"
    )


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def split_window(window: list[dict[str, Any]], rows: int) -> list[dict[str, Any]]:
    """Every batch of the window cut, in order, into batches of at most `rows` rows.

    The step sums the loss over tokens and divides by the window's token count once, so cutting
    the same rows into more micro-batches leaves the step's loss and gradient unchanged.
    """
    out = []
    for batch in window:
        size = len(batch["input_ids"])
        out += [{k: v[start : start + rows] for k, v in batch.items()} for start in range(0, size, rows)]
    return out


class OomBackoff:
    """Runs one optimizer step; on out-of-memory halves the micro-batch and retries the same step.

    `micro` rows go through each forward pass; a window of `batch_size`-row batches becomes
    `ceil(batch_size / micro)` times as many micro-batches. `reset` must zero the gradients of
    the failed attempt. Several processes cannot change their micro-batch together in the
    middle of a step, so there the run stops and says which value to resume with.
    """

    def __init__(self, micro: int, processes: int, advice: str, reset: Callable[[], None]) -> None:
        self.micro, self.processes, self.advice, self.reset = micro, processes, advice, reset

    def run(self, step_fn: Callable[[list], dict[str, float]], window: list, step: int) -> dict[str, float]:
        while True:
            try:
                return step_fn(split_window(window, self.micro))
            except Exception as err:  # anything that is not an OOM is raised again
                if not is_out_of_memory(err):
                    raise
            # Outside the `except`: the traceback, and the activations its frames hold, are gone.
            self.reset()
            release_memory()
            self._halve(step, sum(len(b["input_ids"]) for b in window))

    def _halve(self, step: int, rows: int) -> None:
        if self.processes > 1:
            raise GuardStop(
                f"out of memory at step {step} with a micro-batch of {self.micro} rows on one of "
                f"{self.processes} processes, which cannot change their micro-batch together mid-step. "
                f"Resume with --resume --set training.micro_batch_size={max(1, self.micro // 2)}. "
                + self.advice
            )
        if self.micro == 1:
            raise GuardStop(f"out of memory at step {step} even with a micro-batch of 1 row. {self.advice}")
        old, self.micro = self.micro, self.micro // 2
        log.warning(
            "out of memory at step %d with a micro-batch of %d rows: retrying the step with %d rows a "
            "micro-batch (%d micro-batches for its %d rows; effective batch unchanged)",
            step,
            old,
            self.micro,
            math.ceil(rows / self.micro),
            rows,
        )


class SkipNonFinite:
    """Wraps the optimizer: `step()` does nothing when a gradient is NaN or infinite.

    The caller zeroes the gradients after `step()` as usual, so a skipped step leaves no trace
    but `skipped`. Under fp16 the gradient scaler already skips overflowing steps (and must see
    them to lower its scale), so the wrapper then steps as usual.
    """

    def __init__(self, optimizer: Any, reduce: Reduce | None = None) -> None:
        self.optimizer, self.reduce, self.skipped = optimizer, reduce, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def step(self, *args: Any, **kwargs: Any) -> None:
        self.skipped = getattr(self.optimizer, "scaler", None) is None and not self._finite()
        if not self.skipped:
            self.optimizer.step(*args, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _finite(self) -> bool:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True  # DeepSpeed keeps the gradients itself and handles overflow
        # FSDP2 keeps gradients as DTensors: each process checks its own shard, and `reduce` agrees.
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        # A NaN or inf anywhere makes that gradient's norm NaN or inf. The norms need no temporary the
        # size of a gradient, where isfinite(g) made three (a full-size |g| among them: 190 MB of a
        # SmolLM2 step's peak memory, issue #7). Only a finite gradient above ~1e19 would also count.
        norms = torch._foreach_norm(local)
        bad = (~torch.isfinite(torch.stack([n.float() for n in norms]))).sum().float()
        if self.reduce is not None:  # sharded gradients (FSDP): every process must decide alike
            bad = self.reduce(bad)
        return float(bad) == 0.0


class HealthMonitor:
    """Watches the per-token training loss step by step, and the held-out score at the end.

    `kd_scale` is T^2 when both loss parts act (a teacher and 0 < alpha < 1), else None. Losses
    are summed over processes first (`reduce`), so every process takes the same decisions.
    """

    def __init__(
        self,
        window: int | None,
        explode_factor: float | None,
        max_bad_steps: int,
        ratio_limit: float | None,
        min_quality_gain: float | None,
        kd_scale: float | None,
        reduce: Reduce | None = None,
    ) -> None:
        self.window, self.explode_factor, self.max_bad_steps = window, explode_factor, max_bad_steps
        self.ratio_limit, self.min_quality_gain, self.kd_scale = ratio_limit, min_quality_gain, kd_scale
        self.reduce = reduce
        self.losses: deque[float] = deque(maxlen=2 * (window or 50))
        self.bad_in_row = self.skipped = 0
        self.quiet_until = {"plateau": 0, "explode": 0}
        self.ratio_warned = False

    def after_step(self, step: int, stats: dict[str, float], skipped: bool) -> bool:
        """Check one optimizer step; False when it was skipped (keep it out of the logged means)."""
        sums = torch.tensor([float(stats["loss"]), float(stats["trained"])], dtype=torch.float64)
        if self.reduce is not None:
            sums = self.reduce(sums)
        loss = float(sums[0] / max(float(sums[1]), 1.0))
        if skipped or not math.isfinite(loss):
            self._bad_step(step, loss)
            return False
        self.bad_in_row = 0
        self._check_explosion(step, loss)
        self.losses.append(loss)
        self._check_plateau(step)
        return True

    def _bad_step(self, step: int, loss: float) -> None:
        self.bad_in_row += 1
        self.skipped += 1
        what = f"the loss is {loss}" if not math.isfinite(loss) else "a gradient is NaN or infinite"
        if self.bad_in_row >= self.max_bad_steps:
            raise GuardStop(
                f"stopped at step {step}: {what}, {self.bad_in_row} steps in a row "
                f"(training.health.max_bad_steps={self.max_bad_steps}). {LOSS_ADVICE[0].upper()}"
                f"{LOSS_ADVICE[1:]}; then run again with --overwrite"
            )
        log.warning("step %d: %s; the step was skipped (no update, gradients zeroed)", step, what)

    def _check_explosion(self, step: int, loss: float) -> None:
        recent = list(self.losses)[-(self.window or 50) :]
        if self.explode_factor is None or len(recent) < 10 or step < self.quiet_until["explode"]:
            return
        mean = sum(recent) / len(recent)
        if loss > self.explode_factor * mean:
            self.quiet_until["explode"] = step + len(recent)
            log.warning(
                "step %d: the loss exploded to %.4g, %.0fx the mean of the last %d steps (%.4g); %s",
                step,
                loss,
                loss / mean,
                len(recent),
                mean,
                LOSS_ADVICE,
            )

    def _check_plateau(self, step: int) -> None:
        w = self.window
        if w is None or len(self.losses) < 2 * w or step < self.quiet_until["plateau"]:
            return
        history = list(self.losses)
        older, newer = sum(history[:w]) / w, sum(history[w:]) / w
        if newer >= older:
            self.quiet_until["plateau"] = step + w  # say it once a window, not every step
            log.warning(
                "step %d: the loss has not decreased over the last %d steps (mean %.4g, against %.4g over "
                "the %d steps before); %s",
                step,
                w,
                newer,
                older,
                w,
                LOSS_ADVICE,
            )

    def on_log(self, record: dict[str, float]) -> dict[str, float]:
        """Extra metrics for a logged window: `loss/kd_ce_ratio` (T^2 x KD over CE, what alpha weighs)."""
        extra: dict[str, float] = {}
        if self.skipped:
            extra["health/skipped_steps"] = float(self.skipped)
        if self.kd_scale is None or not record.get("loss/ce"):
            return extra
        kd = self.kd_scale * record["loss/kd"]
        ratio = extra["loss/kd_ce_ratio"] = kd / record["loss/ce"]
        limit = self.ratio_limit
        if limit is not None and not self.ratio_warned and ratio > 0 and not 1 / limit <= ratio <= limit:
            self.ratio_warned = True
            small, factor = ("KD", 1 / ratio) if ratio < 1 else ("CE", ratio)
            log.warning(
                "the %s part of the loss is %.0fx smaller than the other (T^2 x KD = %.4g, CE = %.4g), so "
                "alpha barely changes the balance between them; change loss.temperature (the KD part "
                "scales with it) or move loss.alpha towards the smaller part",
                small,
                factor,
                kd,
                record["loss/ce"],
            )
        return extra

    def check_quality(self, before: dict[str, float], after: dict[str, float]) -> None:
        """Warn when the held-out KL to the teacher (perplexity without one) barely fell."""
        key = "kl" if "kl" in before and "kl" in after else "ppl"
        if self.min_quality_gain is None or key not in before or key not in after or before[key] <= 0:
            return
        gain = 1 - after[key] / before[key]
        if gain < self.min_quality_gain:
            name = "KL to the teacher" if key == "kl" else "perplexity"
            log.warning(
                "held-out %s went from %.4g to %.4g (%+.1f%%); to keep more of the teacher: %s",
                name,
                before[key],
                after[key],
                -100 * gain,
                QUALITY_ADVICE,
            )


def build_health(
    cfg: Any, alpha: float, temperature: float, has_teacher: bool, reduce: Reduce | None
) -> HealthMonitor:
    """The monitor for `training.health` (a `HealthConfig`)."""
    both_parts = has_teacher and 0 < alpha < 1
    return HealthMonitor(
        window=cfg.window,
        explode_factor=cfg.explode_factor,
        max_bad_steps=cfg.max_bad_steps,
        ratio_limit=cfg.kd_ce_ratio,
        min_quality_gain=cfg.min_quality_gain,
        kd_scale=temperature**2 if both_parts else None,
        reduce=reduce,
    )
