"""Training metrics: per-token means over a logging window, and `metrics.jsonl`.

Metric names are stable (`loss`, `loss/kd`, `loss/ce`, `loss/hidden`, `eval/kl`, `teacher/retries`, ...);
they go to `metrics.jsonl` on the main process and to accelerate's trackers (TensorBoard, W&B) under the
same names.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from kdistill.files import RunFiles, write_atomic, writing
from kdistill.prerun.flops import ModelShape, step_flops
from kdistill.storage.checkpoint import kept_checkpoint
from kdistill.teacher.base import Teacher


class LogWindow:
    """Sums of the steps since the last log line, turned into per-token means and throughput.

    With the student's and live teachers' shapes, each record also has `flops_per_s`: the useful FLOPs
    of the window's tokens (see `run.flops`) over its seconds; steps then add `pairs`.
    """

    def __init__(self, student: ModelShape | None = None, teachers: list[ModelShape] | None = None) -> None:
        self.student, self.teachers = student, teachers or []
        self.reset()

    def reset(self) -> None:
        self.sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "trained": 0, "tokens": 0, "pairs": 0}
        self.grad_norm = None
        self.start = time.perf_counter()

    def add(self, stats: dict[str, float]) -> None:
        # Optional sums join when a step has them: several teachers (`kd/NAME`), loss.hidden (`hidden...`).
        optional = ("kd/", "hidden", "gen_", "retries")
        for key in (*self.sums, *(k for k in stats if k.startswith(optional) and k not in self.sums)):
            self.sums[key] = self.sums.get(key, 0.0) + stats.get(key, 0)
        self.grad_norm = stats.get("grad_norm", self.grad_norm)

    def flush(self, accelerator: Accelerator, lr: float, epoch: float) -> dict[str, float]:
        keys = list(self.sums)
        reduced = accelerator.reduce(
            torch.tensor([float(self.sums[k]) for k in keys], device=accelerator.device), "sum"
        )
        sums = dict(zip(keys, reduced.tolist()))
        seconds = time.perf_counter() - self.start
        trained = max(sums["trained"], 1.0)
        record = {
            "loss": sums["loss"] / trained,
            "loss/kd": sums["kd"] / trained,
            "loss/ce": sums["ce"] / trained,
            "lr": lr,
            "epoch": round(epoch, 4),
            "tokens_per_s": sums["tokens"] / seconds,
            "trained_tokens": int(sums["trained"]),
        }
        if self.student is not None:
            counts = int(sums["tokens"]), int(sums["trained"]), int(sums["pairs"])
            record["flops_per_s"] = step_flops(self.student, self.teachers, *counts) / seconds
        for key in keys:
            # `loss/hidden` is teacher-weighted and without loss.hidden.weight, as `loss/kd` is without
            # alpha T^2; among several teachers, `loss/kd/NAME` and `loss/hidden/NAME` are each one's own.
            if key.startswith(("kd/", "hidden")):
                record[f"loss/{key}"] = sums[key] / trained
        if "retries" in sums:  # served teachers: their requests retried in the window
            record["teacher/retries"] = int(sums["retries"])
        if sums.get("gen_rows"):  # on-policy steps: what the student's generation cost
            record.update(generation_record(sums, seconds * accelerator.num_processes))
        if self.grad_norm is not None:
            record["grad_norm"] = self.grad_norm
        self.reset()
        return record


def generation_record(sums: dict[str, float], seconds: float) -> dict[str, float]:
    """`gen/tokens_per_s` (over the generation's own time), `gen/time_share` (of the window's
    process-seconds, the time steps waited for their rows), `gen/mean_length`, `gen/rows`; with an
    overlapping engine, `gen/hidden_share`: the share of the generation's time that ran while steps
    trained."""
    hidden = sums.get("gen_hidden_seconds", 0.0)
    spent = max(sums["gen_seconds"] + hidden, 1e-9)
    record = {
        "gen/tokens_per_s": sums["gen_tokens"] / spent,
        "gen/time_share": sums["gen_seconds"] / max(seconds, 1e-9),
        "gen/mean_length": sums["gen_tokens"] / sums["gen_rows"],
        "gen/rows": int(sums["gen_rows"]),
        **_engine_record(sums),
    }
    if "gen_hidden_seconds" in sums:
        record["gen/hidden_share"] = hidden / spent
    return record


def _engine_record(sums: dict[str, float]) -> dict[str, float]:
    """With the vLLM engine: `gen/staleness`, the mean over the window's generated steps of the optimizer
    steps the engine's weights lag behind, and `gen/sync_seconds`, the time spent updating them."""
    if not sums.get("gen_steps"):
        return {}
    return {
        "gen/staleness": sums["gen_staleness"] / sums["gen_steps"],
        "gen/sync_seconds": sums["gen_sync_seconds"],
    }


class RetryCount:
    """The retries of the served teachers' requests (`Teacher.retries`): in all, and since the last step."""

    def __init__(self, teachers: list[Teacher], served: bool) -> None:
        self.teachers, self.served = teachers, served  # `served`: the run has a served teacher
        self.total = 0

    def since_last(self) -> dict[str, int]:
        """`{"retries": N}`, the retries since the last call, for a step's stats; empty without a served
        teacher, so that other runs' records keep their keys."""
        if not self.served:
            return {}
        total = sum(t.retries() for t in self.teachers)
        new, self.total = total - self.total, total
        return {"retries": new}


class MetricsFile:
    """`metrics.jsonl` in the run folder (main process only), mirrored to accelerate's trackers."""

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path, self.accelerator = path, accelerator

    def write(self, step: int, values: dict[str, float]) -> None:
        if not values:
            return
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            # A line cut short by a full disk is dropped on --resume (`_step_of`).
            kept = functools.partial(kept_checkpoint, self.path.parent / RunFiles.CHECKPOINTS)
            with writing(f"step {step}'s metrics", self.path, kept), open(self.path, "a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records written after `step`: a resumed run writes them again."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        write_atomic(self.path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> float:
    # A run killed mid-write leaves a cut last line; it is dropped with the records after the checkpoint.
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
