"""Students pruned from the teacher by importance, in depth and in width (Minitron), and their shapes.

`build_pruned` is the one entry: it reads `student.from_teacher`, scores the teacher's units on the
calibration batches (`importance`), picks the units to keep (`surgery.choose`) and cuts the student
(`surgery.prune`). `shape` knows a student's shape and size from config.json files alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from kdistill.config.student import FromTeacher
from kdistill.errors import KdistillError
from kdistill.models.prune.importance import Importance, removal_scores, score_units
from kdistill.models.prune.shape import PrunedShape, build_shape, count_params, teacher_shape
from kdistill.models.prune.surgery import Kept, choose, prune

__all__ = ["Pruned", "PrunedShape", "build_pruned", "build_shape", "count_params"]


@dataclass
class Pruned:
    """A pruned student and how it was chosen."""

    model: nn.Module
    shape: PrunedShape
    kept: Kept
    importance: Importance
    depth_score: str
    seconds: dict[str, float] = field(default_factory=dict)  # calibration and removal scoring

    def depth_scores(self) -> list[float]:
        """The layer scores that chose the layers."""
        return self.importance.influence if self.importance.removal is None else self.importance.removal


def build_pruned(
    teacher: nn.Module, cfg: FromTeacher, calibration: list[dict[str, torch.Tensor]], progress: bool = True
) -> Pruned:
    """The `method: importance` student of `cfg`, pruned from the full-precision `teacher`."""
    if getattr(teacher.config, "quantization_config", None) is not None:
        raise KdistillError(
            "student.from_teacher needs an unquantized teacher; set teacher.quantization: none"
        )
    if not calibration:
        raise KdistillError("student.from_teacher.method: importance needs calibration rows; none were given")
    shape = build_shape(teacher.config, cfg)
    device = next(teacher.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in calibration]
    started = time.perf_counter()
    importance = score_units(teacher, batches, progress)
    seconds = {"calibration": time.perf_counter() - started}
    if cfg.depth_score != "block_influence" and shape.layers < teacher.config.num_hidden_layers:
        started = time.perf_counter()
        metric = "kl" if cfg.depth_score == "removal_kl" else "loss"
        importance.removal = removal_scores(teacher, batches, metric, progress)
        seconds["removal"] = time.perf_counter() - started
    depth = importance.influence if importance.removal is None else importance.removal
    kept = choose(importance, depth, shape, teacher_shape(teacher.config))
    return Pruned(prune(teacher, shape, kept), shape, kept, importance, cfg.depth_score, seconds)
