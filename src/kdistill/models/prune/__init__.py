"""Students pruned from the teacher by importance, in depth and in width (Minitron), and their shapes.

`build_pruned` is the one entry: it reads `student.from_teacher`, scores the teacher's units on the
calibration batches (`score_teacher`), picks the units to keep (`surgery.choose`) and cuts the student
(`cut`). `shape` knows a student's shape and size from config.json files alone; `candidates` lists the
shapes of one budget that `kdistill prune --search` ranks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from kdistill.config.student import FromTeacher
from kdistill.errors import KdistillError
from kdistill.models.prune.importance import Importance, removal_scores, score_units
from kdistill.models.prune.shape import PrunedShape, build_shape, count_params, teacher_shape
from kdistill.models.prune.surgery import Kept, choose, prune, refit_mlp, top

log = logging.getLogger("kdistill")

__all__ = [
    "Pruned",
    "PrunedShape",
    "Scores",
    "build_pruned",
    "build_shape",
    "count_params",
    "cut",
    "score_teacher",
]


@dataclass
class Scores:
    """Every unit's importance in the full teacher, and what computing it cost."""

    importance: Importance
    depth_score: str
    seconds: dict[str, float] = field(default_factory=dict)  # calibration and removal scoring

    def depth(self) -> list[float]:
        """Each layer's score (higher: more important). For contiguous removal: the cost of the cheapest
        scored block that holds the layer, so the layers of the cheapest block score lowest."""
        imp = self.importance
        if imp.contiguous is not None:
            width = len(imp.influence) - len(imp.contiguous) + 1
            holding = lambda i: imp.contiguous[max(0, i - width + 1) : i + 1]  # noqa: E731
            return [min(holding(i)) for i in range(len(imp.influence))]
        return imp.influence if imp.removal is None else imp.removal

    def kept_layers(self, count: int) -> list[int]:
        """The `count` layers to keep: all but the cheapest contiguous block, or the best scores."""
        imp, total = self.importance, len(self.importance.influence)
        if imp.contiguous is not None:
            if len(imp.contiguous) != count + 1:  # blocks of total - count layers start at 0 .. count
                raise KdistillError(
                    f"contiguous removal was scored for {total - len(imp.contiguous) + 1} layers off, not "
                    f"{total - count}"
                )
            start = min(range(len(imp.contiguous)), key=imp.contiguous.__getitem__)
            return [i for i in range(total) if not start <= i < start + total - count]
        return top(self.depth(), count).tolist()


@dataclass
class Pruned:
    """A pruned student and how it was chosen."""

    model: nn.Module
    shape: PrunedShape
    kept: Kept
    scores: Scores


def build_pruned(
    teacher: nn.Module, cfg: FromTeacher, calibration: list[dict[str, torch.Tensor]], progress: bool = True
) -> Pruned:
    """The `method: importance` student of `cfg`, pruned from the full-precision `teacher`."""
    shape = build_shape(teacher.config, cfg)
    return cut(teacher, score_teacher(teacher, cfg, calibration, shape.layers, progress), shape)


def score_teacher(
    teacher: nn.Module,
    cfg: FromTeacher,
    calibration: list[dict[str, torch.Tensor]],
    layers: int,
    progress: bool = True,
) -> Scores:
    """Every unit's importance on the calibration batches; the removal scores of `cfg.depth_score`
    are computed only for students of fewer than the teacher's layers (`layers`)."""
    if getattr(teacher.config, "quantization_config", None) is not None:
        raise KdistillError(
            "student.from_teacher needs an unquantized teacher; set teacher.quantization: none"
        )
    if not calibration:
        raise KdistillError("student.from_teacher.method: importance needs calibration rows; none were given")
    device = next(teacher.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in calibration]
    started = time.perf_counter()
    importance = score_units(teacher, batches, progress, gram=cfg.mlp_refit)
    seconds = {"calibration": time.perf_counter() - started}
    drop = teacher.config.num_hidden_layers - layers
    if cfg.depth_score != "block_influence" and drop > 0:
        started = time.perf_counter()
        metric = "kl" if cfg.depth_score.endswith("kl") else "loss"
        if cfg.depth_score.startswith("contiguous"):
            blocks = [list(range(start, start + drop)) for start in range(layers + 1)]
            importance.contiguous = removal_scores(teacher, batches, metric, progress, blocks)
        else:
            importance.removal = removal_scores(teacher, batches, metric, progress)
        seconds["removal"] = time.perf_counter() - started
    return Scores(importance, cfg.depth_score, seconds)


def cut(teacher: nn.Module, scores: Scores, shape: PrunedShape) -> Pruned:
    """The student of `shape` that keeps the units `scores` ranks highest (its MLPs refit when the
    scores hold the activations' Gram matrices: `mlp_refit`)."""
    kept = choose(scores.importance, scores.kept_layers(shape.layers), shape, teacher_shape(teacher.config))
    student = prune(teacher, shape, kept)
    if scores.importance.gram is not None:
        tokens = scores.importance.tokens
        if tokens < 4 * shape.intermediate < 4 * teacher_shape(teacher.config).intermediate:
            log.warning(
                "student.from_teacher.mlp_refit: %d calibration tokens for %d kept MLP neurons a layer; the "
                "refit may fit those rows rather than the data (raise calibration_rows)",
                tokens,
                shape.intermediate,
            )
        refit_mlp(student, teacher, kept, scores.importance.gram)
    return Pruned(student, shape, kept, scores)
