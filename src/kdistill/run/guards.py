"""Guards that keep a long run alive, or stop it with the troubleshooting advice of the KD guide
behind configs/seed.yaml.

- Out of memory: the micro-batch is halved (twice the micro-batches per optimizer step, so the
  effective batch and the token normalisation are unchanged) and the same step is retried on the
  same rows.
- NaN or infinite gradients: the optimizer update is skipped; several such steps in a row stop the run.

The run's health (a loss that stops falling or explodes) is watched in `health`. Everything here
takes plain values.
"""

from __future__ import annotations

import gc
import logging
import math
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

    def run(
        self,
        step_fn: Callable[[list, int, list | None], dict[str, float]],
        window: list,
        step: int,
        upcoming: list | None = None,
    ) -> dict[str, float]:
        """`step_fn(window, step, upcoming)` with both windows cut into micro-batches of `micro` rows
        (`upcoming`, the next step's window, None after the last), retried finer on out-of-memory."""
        while True:
            try:
                cut = None if upcoming is None else split_window(upcoming, self.micro)
                return step_fn(split_window(window, self.micro), step, cut)
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
        # size of a gradient, where isfinite(g) makes three (a full-size |g| among them: 190 MB of a
        # SmolLM2 step's peak memory). Only a finite gradient above ~1e19 would also count.
        norms = torch._foreach_norm(local)
        bad = (~torch.isfinite(torch.stack([n.float() for n in norms]))).sum().float()
        if self.reduce is not None:  # sharded gradients (FSDP): every process must decide alike
            bad = self.reduce(bad)
        return float(bad) == 0.0
