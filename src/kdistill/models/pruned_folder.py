"""`kdistill prune`: a `from_teacher` student written as a model folder, with how it was chosen.

The folder holds the model (safetensors and config.json) and the teacher's tokenizer, so it can be
given as `student.model`, and beside them:
- `importance.json`: every unit's score and the units kept;
- `prune.json`: the shape, parameter counts (total and non-embedding), held-out perplexity and KL to
  the teacher before training, the time calibration and scoring took;
- `layers.png`: the layer scores, the kept layers marked (skipped with a note without matplotlib).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdistill.config import RunConfig
from kdistill.errors import KdistillError
from kdistill.models.build import full_precision, load_teacher, teacher_source
from kdistill.models.even_cut import shrink
from kdistill.models.loading import load_tokenizer, resolve
from kdistill.models.parts import default_device
from kdistill.models.prune import Pruned, build_pruned
from kdistill.models.prune.calibration import load_calibration, load_held_out
from kdistill.models.prune.quality import response_quality

log = logging.getLogger("kdistill")


@dataclass
class PruneSource:
    """What every student pruned from one run's teacher is made and measured with."""

    cfg: RunConfig
    teacher: Any
    tokenizer: Any
    held_out: list[dict[str, Any]]
    memo: dict[int, Any] = field(default_factory=dict)  # the teacher's held-out log-probs, per batch


def open_source(cfg: RunConfig, output: Path, eval_rows: int) -> PruneSource:
    """The run's full-precision teacher, its tokenizer and `eval_rows` held-out rows, after checking
    that there is a student to make and that `output` is free (before anything loads)."""
    if cfg.student.from_teacher is None:
        raise KdistillError("kdistill prune makes a student from the teacher: give student.from_teacher")
    if output.exists() and any(output.iterdir()):
        raise KdistillError(f"--output {output} is not empty; give a new folder")
    t = cfg.teacher
    tokenizer = load_tokenizer(resolve(t.tokenizer) if t.tokenizer else teacher_source(t))
    teacher = load_teacher(full_precision(t), default_device())
    return PruneSource(cfg, teacher, tokenizer, load_held_out(cfg, tokenizer, eval_rows))


def write_pruned(cfg: RunConfig, output: Path, eval_rows: int = 64, progress: bool = True) -> dict[str, Any]:
    """Prune (or cut) the run's `from_teacher` student, measure it and write it to `output`.

    Returns what `prune.json` holds.
    """
    source = open_source(cfg, output, eval_rows)
    settings = cfg.student.from_teacher
    started = time.perf_counter()
    pruned = None
    if settings.method == "importance":
        calibration = load_calibration(cfg, source.tokenizer)
        pruned = build_pruned(source.teacher, settings, calibration, progress)
        student = pruned.model
    else:
        student = shrink(source.teacher, settings.num_layers)
    return write_student(source, output, student, pruned, time.perf_counter() - started, progress=progress)


def write_student(
    source: PruneSource,
    output: Path,
    student: Any,
    pruned: Pruned | None,
    seconds: float,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure `student` on the held-out rows and write it, with prune.json (plus `extra`),
    importance.json and layers.png, to `output`. The folder appears only when complete: it is written
    beside `output` and renamed at the end. Returns what `prune.json` holds."""
    teacher = source.teacher
    quality = response_quality(teacher, student, source.held_out, progress, source.memo)
    summary = {
        "method": source.cfg.student.from_teacher.method,
        "depth_score": pruned.scores.depth_score if pruned else None,
        "shape": _shape(student.config),
        "teacher_shape": _shape(teacher.config),
        "params": parameter_counts(student),
        "teacher_params": parameter_counts(teacher),
        "held_out_before_training": quality,
        "seconds": {"total": seconds, **(pruned.scores.seconds if pruned else {})},
        **(extra or {}),
    }
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    student.save_pretrained(partial)
    source.tokenizer.save_pretrained(partial)
    (partial / "prune.json").write_text(json.dumps(summary, indent=2) + "\n")
    if pruned is not None:
        (partial / "importance.json").write_text(json.dumps(importance_record(pruned)) + "\n")
        plot_layers(pruned, partial / "layers.png")
    if output.exists():
        output.rmdir()
    partial.rename(output)
    return summary


def parameter_counts(model: Any) -> dict[str, int]:
    """Total parameters (a tied head once) and non-embedding ones (no input embedding, no untied head)."""
    total = sum(p.numel() for p in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    outside = embedding.numel() + (0 if head is embedding else head.numel())
    return {"total": total, "non_embedding": total - outside}


def importance_record(pruned: Pruned) -> dict[str, Any]:
    return {
        "depth_score": pruned.scores.depth_score,
        "scores": pruned.scores.importance.to_json(),
        "kept": pruned.kept.to_json(),
    }


def _shape(config: Any) -> dict[str, int]:
    keys = (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
    )
    return {key: int(getattr(config, key)) for key in keys} | {
        "head_dim": int(getattr(config, "head_dim", 0))
    }


def plot_layers(pruned: Pruned, path: Path) -> None:
    """A bar per teacher layer: its score, the kept ones in colour."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no layers.png (pip install matplotlib)")
        return
    scores = pruned.scores.depth()
    kept = set(pruned.kept.layers)
    fig, ax = plt.subplots(figsize=(max(6, len(scores) * 0.3), 3.2))
    ax.bar(
        range(len(scores)),
        scores,
        color=["tab:blue" if i in kept else "lightgray" for i in range(len(scores))],
    )
    ax.set_xlabel("teacher layer (kept in blue)")
    ax.set_ylabel(pruned.scores.depth_score.replace("_", " "))
    ax.set_title(f"layer importance: {len(kept)} of {len(scores)} kept")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
