"""`kdistill prune --search K`: rank the shapes of one budget by a short distillation each (Minitron).

1. Score the teacher's units once on the calibration rows.
2. Cut every shape of the grid (`models.prune.candidates`) and measure it on the first
   `screen_rows` held-out rows, untrained: its KL to the teacher.
3. The K lowest go on: each is written as a folder and trained `steps` optimizer steps by the run's
   own config (the same data, loss, learning rate and seed; only the student and the step count
   differ), through the same `kdistill train`.
4. The shape with the lowest held-out KL after those steps is kept: it is cut again and written,
   untrained, as the output folder, with every candidate's figures in prune.json's `search`.

Minitron ("Compact Language Models via Pruning and Knowledge Distillation", 2024) found the order of
shapes right after pruning a poor guide to their order after distillation; hence step 3.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kdistill.config import RunConfig
from kdistill.errors import KdistillError
from kdistill.models.prune import PrunedShape, cut, score_teacher
from kdistill.models.prune.calibration import HELD_OUT_BATCH, load_calibration
from kdistill.models.prune.candidates import candidate_shapes
from kdistill.models.prune.quality import response_quality
from kdistill.models.pruned_folder import PruneSource, open_source, parameter_counts, write_student
from kdistill.run.loop import train

log = logging.getLogger("kdistill")


def search_pruned(
    cfg: RunConfig, output: Path, eval_rows: int, finalists: int, steps: int, screen_rows: int = 16
) -> dict[str, Any]:
    """The best of `finalists` shapes after `steps` steps each, written untrained to `output`;
    returns what its prune.json holds."""
    settings = cfg.student.from_teacher
    if settings is None or settings.method != "importance":
        raise KdistillError("kdistill prune --search needs student.from_teacher.method: importance")
    if settings.depth_score.startswith("contiguous"):
        raise KdistillError(
            f"kdistill prune --search ranks shapes of several depths, and depth_score {settings.depth_score} "
            "scores blocks of one size; use block_influence, removal_kl or removal_loss with --search"
        )
    if finalists < 1 or steps < 1:
        raise KdistillError(f"--search {finalists} --search-steps {steps}: give at least 1 of each")
    source = open_source(cfg, output, eval_rows)
    teacher = source.teacher
    shapes = candidate_shapes(teacher.config, settings)
    started = time.perf_counter()
    calibration = load_calibration(cfg, source.tokenizer)
    scores = score_teacher(teacher, settings, calibration, min(s.layers for s in shapes))
    screen = source.held_out[: -(-screen_rows // HELD_OUT_BATCH)]
    rows = [_screened(source, scores, shape, screen) for shape in tqdm(shapes, desc="search: untrained KL")]
    chosen = sorted(rows, key=lambda r: r["untrained"]["kl"])[:finalists]
    with tempfile.TemporaryDirectory(prefix=".search-", dir=output.parent) as work:
        for i, row in enumerate(chosen, 1):
            log.info("search: candidate %d of %d, %s", i, len(chosen), row["shape"].describe())
            row["trained"] = _short_run(source, scores, row["shape"], Path(work) / f"candidate-{i}", steps)
            log.info(
                "search: candidate %d of %d after %d steps: held-out KL %.4f, perplexity %.2f",
                *(i, len(chosen), steps, row["trained"]["kl"], row["trained"]["ppl"]),
            )
    best = min(chosen, key=lambda r: r["trained"]["kl"])
    best["chosen"] = True
    pruned = cut(teacher, scores, best["shape"])
    table = [_record(r) for r in sorted(rows, key=_rank)]
    search = {"candidates": table, "steps": steps, "screen_rows": screen_rows, "finalists": finalists}
    seconds = time.perf_counter() - started
    return write_student(source, output, pruned.model, pruned, seconds, {"search": search})


def _screened(source: PruneSource, scores: Any, shape: PrunedShape, screen: list) -> dict[str, Any]:
    model = cut(source.teacher, scores, shape).model
    quality = response_quality(source.teacher, model, screen, progress=False, memo=source.memo)
    return {"shape": shape, "params": parameter_counts(model), "untrained": quality}


def _short_run(
    source: PruneSource, scores: Any, shape: PrunedShape, work: Path, steps: int
) -> dict[str, float]:
    """`steps` steps of the run's own training from the candidate: held-out KL and perplexity after."""
    folder = work / "student"
    cut(source.teacher, scores, shape).model.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    config = source.cfg.model_dump(mode="json")
    config["student"] |= {"model": str(folder), "from_teacher": None}
    config["training"] |= {"max_steps": steps, "save_steps": None, "eval_steps": None, "report_to": []}
    config["output_dir"] = str(work / "run")
    started = time.perf_counter()
    summary = train(RunConfig.model_validate(config), overwrite=True)
    return {"kl": summary.after["kl"], "ppl": summary.after["ppl"], "seconds": time.perf_counter() - started}


def _rank(row: dict[str, Any]) -> tuple[float, float]:
    """Trained candidates first, by KL after training; the rest by untrained KL."""
    trained = row.get("trained")
    return (0, trained["kl"]) if trained else (1, row["untrained"]["kl"])


def _record(row: dict[str, Any]) -> dict[str, Any]:
    q = row["untrained"]
    return {
        "shape": row["shape"].as_dict(),
        "params": row["params"],
        "untrained": {"kl": q["kl"], "ppl": q["ppl"], "agree": q["agree"]},
        "trained": row.get("trained"),
        "chosen": row.get("chosen", False),
    }
