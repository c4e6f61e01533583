"""kdistill's Python API: what the `kdistill` command does, for notebooks and scripts.

    import kdistill

    summary = kdistill.train("configs/quickstart.yaml", overrides=["training.max_steps=20"])
    result = kdistill.evaluate(summary.output_dir, tasks="none")
    path = kdistill.export(summary.output_dir, gguf_type="q8_0")

Every function raises `kdistill.KdistillError` for input the user can fix (the command line prints its
message and exits 2); progress bars are tqdm's `auto` ones, so they show in a notebook too. The command
line calls these same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdistill.config import RunConfig
from kdistill.config import load_config as _load_config
from kdistill.errors import KdistillError
from kdistill.eval.card import card_after, write_card
from kdistill.eval.export import export_gguf
from kdistill.eval.report import report_after_training
from kdistill.files import RunFiles
from kdistill.run.loop import RunSummary
from kdistill.run.loop import train as _train

__all__ = [
    "KdistillError",
    "RunSummary",
    "evaluate",
    "export",
    "load_config",
    "prune",
    "train",
    "write_card",
]


def load_config(config: str | Path | dict[str, Any] | RunConfig, overrides: Sequence[str] = ()) -> RunConfig:
    """A validated run config from a YAML/JSON file, a dict shaped like one, or a `RunConfig`, with
    `overrides` (`"training.learning_rate=1e-5"`, as `--set` takes them) applied."""
    if isinstance(config, RunConfig):
        config = config.model_dump(mode="json")
    return _load_config(config, list(overrides))


def train(
    config: str | Path | dict[str, Any] | RunConfig,
    *,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    report: bool = True,
) -> RunSummary:
    """Distil the student that `config` describes into its `output_dir`; returns the run's summary
    (steps, seconds, held-out KL and perplexity before and after).

    `resume` continues from the newest checkpoint, `overwrite` replaces a non-empty folder; `force`
    (with `resume`) continues although the config changes what is trained (it is refused otherwise). With
    `report`, the run's report (report.md, report.html) and model card (README.md) are written after.
    A run stopped by SIGINT/SIGTERM raises `kdistill.run.stop_signals.Interrupted` after its checkpoint.
    """
    if force and not resume:
        raise KdistillError("--force goes with --resume: it continues a run whose config has changed")
    path = str(config) if isinstance(config, str | Path) else "CONFIG"
    cfg = load_config(config, overrides)
    summary = _train(cfg, resume=resume, overwrite=overwrite, config_path=path, force=force)
    if report and Path(summary.output_dir).is_dir():  # on the main process: the others write no folder
        report_after_training(Path(summary.output_dir))
        card_after(Path(summary.output_dir))
    return summary


def evaluate(
    target: str | Path,
    *,
    teacher: str | None = None,
    validation: str | None = None,
    tasks: str | Sequence[str] = "all",
    data_dir: str | None = None,
    limit: int | None = 200,
    rows: int | None = None,
    rouge_rows: int = 32,
    generations: int = 3,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    output: str | Path | None = None,
    teacher_scores: str | Path | None = None,
) -> dict[str, Any]:
    """Held-out quality and benchmarks of a student (a run folder, or any model) against its teacher.

    The result is the dict `kdistill eval` writes as eval.json (see `kdistill.eval.runner`); it is
    written to `output`, by default into the run folder, whose model card then shows it, and
    `result["written_to"]` says where. `tasks` is
    "all", "none" or task names; without benchmark data (`data_dir`, `$KDISTILL_EVAL_DATA`) "all"
    skips them with a warning and named tasks are an error. `teacher_scores` names an earlier eval.json
    made with the same benchmark settings: the teacher's benchmark scores are taken from it instead of
    being measured again.
    """
    import logging

    from kdistill.eval.load import load_eval_models
    from kdistill.eval.runner import EvalSettings, reused_teacher_scores, write_json
    from kdistill.eval.runner import evaluate as _evaluate
    from kdistill.eval.tasks import NO_DATA, benchmark_source, parse_tasks

    names = parse_tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
    source = benchmark_source(data_dir) if names else None
    if names and source is None:
        if tasks != "all":
            raise KdistillError(NO_DATA)
        logging.getLogger("kdistill").warning("%s; benchmarks skipped", NO_DATA)
        names = []
    reused = None
    if teacher_scores is not None and names:
        reused = reused_teacher_scores(Path(teacher_scores), names, source, limit, num_fewshot)
    models = load_eval_models(str(target), teacher, validation)
    settings = EvalSettings(
        tasks=tuple(names), source=source, limit=limit, rows=rows, rouge_rows=rouge_rows, show=generations,
        max_new_tokens=max_new_tokens, batch_size=batch_size, num_fewshot=num_fewshot,
        teacher_benchmarks=reused,
    )  # fmt: skip
    result = _evaluate(models, settings)
    written = output or (models.run_dir / RunFiles.EVAL if models.run_dir else None)
    if written:
        write_json(result, Path(written))
        result["written_to"] = str(written)
    if models.run_dir is not None and not output:
        card_after(models.run_dir)
    return result


def prune(
    config: str | Path | dict[str, Any] | RunConfig,
    *,
    overrides: Sequence[str] = (),
    output: str | Path | None = None,
    eval_rows: int = 64,
    search: int = 0,
    search_steps: int = 10,
) -> tuple[Path, dict[str, Any]]:
    """Write the `student.from_teacher` student of `config` as a model folder (by default
    OUTPUT_DIR-pruned) with how it was chosen and where it starts; returns the folder and what its
    prune.json holds. With `search`, that many shapes of the `params` budget are each trained
    `search_steps` steps and the best is written (`kdistill.api.search`)."""
    from kdistill.api.search import search_pruned
    from kdistill.models.pruned_folder import write_pruned

    cfg = load_config(config, overrides)
    folder = Path(output or f"{cfg.output_dir.rstrip('/')}-pruned")
    if search:
        return folder, search_pruned(cfg, folder, eval_rows, search, search_steps)
    return folder, write_pruned(cfg, folder, eval_rows)


def export(target: str | Path, *, gguf_type: str = "f32", output: str | Path | None = None) -> Path:
    """Write the student of `target` (a run folder, a LoRA student merged into its base; or a model
    folder) as a GGUF file for llama.cpp and Ollama: `gguf_type` is f32, f16 or q8_0. Returns its path,
    by default `student-TYPE.gguf` inside the run folder."""
    return export_gguf(target, gguf_type, output)
