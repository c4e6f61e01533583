"""`kdistill eval`: held-out metrics, generations and benchmarks for student and teacher, side by side.

The result is one JSON-able dict (written to `eval.json`):

    {"student": NAME, "teacher": NAME, "device": ..., "seconds": ...,
     "held_out": {"source", "rows", "student": {ppl, ce, kl, top1, rouge_l, tokens, answer_words, rep4,
                  teacher_nll}, "teacher": {...}},
     "benchmarks": {"data_dir", "limit", "tasks": {TASK: {"student": {acc, acc_stderr, n}, "teacher": ...}}},
     "generations": [{"prompt", "reference", "student", "teacher"}],
     "kept": {METRIC: share of the teacher's value; benchmarks above chance, null if not meaningful},
     "retention": {"margin", "mean", "counted", "tasks": {TASK: {...}}}}  (eval/retention.py)

`answer_words`, `rep4` and `teacher_nll` describe each model's greedy answers to the ROUGE-L prompts:
mean words, share of repeated word 4-grams, and the teacher's per-token NLL of them (eval/answers.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdistill.data import tokenize_examples, tokenize_with_views
from kdistill.errors import KdistillError
from kdistill.eval.answers import answer_shape, teacher_nll
from kdistill.eval.harness import run_benchmarks
from kdistill.eval.load import EvalModels
from kdistill.eval.metrics import (
    CrossTeacher,
    greedy_responses,
    held_out_metrics,
    kept,
    kept_above_chance,
    mean_rouge_l,
)
from kdistill.eval.retention import retention
from kdistill.eval.tasks import CHANCE
from kdistill.files import write_atomic

log = logging.getLogger("kdistill")


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate; plain values from the command line."""

    tasks: tuple[str, ...] = ()
    source: str | Path | None = None  # a folder of benchmark files, or lm-eval's own tasks
    limit: int | None = None  # items per benchmark task; None = all
    rows: int | None = None  # held-out rows for perplexity / KL / top-1; None = all
    rouge_rows: int = 32  # held-out rows generated for ROUGE-L
    show: int = 3  # generations shown side by side
    max_new_tokens: int = 128
    batch_size: int = 8
    num_fewshot: int | None = None
    teacher_benchmarks: dict[str, Any] | None = None  # the teacher's scores per task, reused, not measured


def evaluate(models: EvalModels, settings: EvalSettings) -> dict[str, Any]:
    """Evaluate student and teacher; see the module docstring for the result's layout."""
    started = time.perf_counter()
    result: dict[str, Any] = {
        "student": models.student_name,
        "teacher": models.teacher_name,
        "device": str(next(models.student.parameters()).device),
    }
    if models.validation:
        result["held_out"], result["generations"] = held_out_section(models, settings)
    if settings.tasks:
        result["benchmarks"] = benchmark_section(models, settings)
        result["retention"] = retention(result["benchmarks"]["tasks"])
    result["kept"] = kept_shares(result)
    result["seconds"] = time.perf_counter() - started
    return result


def held_out_section(models: EvalModels, s: EvalSettings) -> tuple[dict[str, Any], list[dict[str, str]]]:
    examples = models.validation[: s.rows] if s.rows else models.validation
    t_tok = models.teacher_tokenizer or models.tokenizer
    cross = None
    if models.mapping is not None:  # another tokenizer: rows carry the teacher's aligned view, as in training
        cross = CrossTeacher(models.mapping, t_tok.pad_token_id, models.alignment)
    views = {"teacher": t_tok} if cross is not None else {}
    rows, dropped = tokenize_with_views(examples, models.tokenizer, models.max_length, views)
    pad = models.tokenizer.pad_token_id
    common = {"batch_size": s.batch_size, "chunk_size": models.chunk_size, "vocab_size": models.vocab_size}
    log.info(
        "held-out: %d rows (%d dropped for length) from %s", len(rows), dropped, models.validation_source
    )
    section: dict[str, Any] = {"source": models.validation_source, "rows": len(rows)}
    both = "student and teacher" if models.teacher is not None and cross is None else "student"
    section["student"], teacher_own = held_out_metrics(
        models.student, models.teacher, rows, pad, **common, cross=cross, progress=f"held-out pass: {both}"
    )
    if models.teacher is not None:
        # The teacher on its own tokens (its own template): its perplexity is per teacher token. With the
        # student's tokenizer those are the same rows, measured in the student's pass.
        if teacher_own is None:
            own = tokenize_examples(examples, t_tok, models.max_length)[0]
            pad_t = t_tok.pad_token_id
            teacher_own, _ = held_out_metrics(
                models.teacher, None, own, pad_t, **common, progress="held-out pass: teacher"
            )
        section["teacher"] = teacher_own
    generated = models.validation[: s.rouge_rows]
    outputs = _answers(models, s, generated, section)
    section["rouge_rows"] = len(generated)
    section["tokenizers"] = (
        "shared" if cross is None else "different (KL aligned; perplexities per own token)"
    )
    shown = [
        {"prompt": e.prompt[-1]["content"] if e.prompt else "", "reference": e.response}
        | {who: texts[i] for who, texts in outputs.items()}
        for i, e in enumerate(generated[: s.show])
    ]
    return section, shown


def _answers(
    models: EvalModels, s: EvalSettings, generated: list[Any], section: dict[str, Any]
) -> dict[str, list[str]]:
    """Each model's greedy answers to `generated`'s prompts; their ROUGE-L against the references, length,
    repetition and the teacher's NLL of them go into `section[who]`."""
    references = [e.response for e in generated]
    outputs = {
        who: greedy_responses(model, tok, generated, s.max_new_tokens, s.batch_size, f"generating: {who}")
        for who, model, tok in _each_model(models)
    }
    t_tok = models.teacher_tokenizer or models.tokenizer
    for who, texts in outputs.items():
        section[who]["rouge_l"] = mean_rouge_l(texts, references)
        section[who] |= answer_shape(texts)
        if models.teacher is not None:  # the teacher's own answers give the reference value
            section[who]["teacher_nll"], section[who]["teacher_nll_stderr"] = teacher_nll(
                models.teacher, t_tok, generated, texts, models.max_length, s.batch_size, models.chunk_size
            )
    return outputs


def benchmark_section(models: EvalModels, s: EvalSettings) -> dict[str, Any]:
    tasks = list(s.tasks)
    run = {"limit": s.limit, "batch_size": s.batch_size, "num_fewshot": s.num_fewshot}
    per_model = {}
    for who, model, tok in _each_model(models):  # each model scores through its own tokenizer
        if who == "teacher" and s.teacher_benchmarks is not None:
            per_model[who] = s.teacher_benchmarks
            continue
        log.info("benchmarks: %s on %s (lm-eval's progress bars follow)", who, ", ".join(tasks))
        per_model[who] = run_benchmarks(model, tok, tasks, s.source, **run)
    return {
        "data_dir": str(s.source),
        "limit": s.limit,
        "num_fewshot": s.num_fewshot,
        "tasks": {t: {who: scores[t] for who, scores in per_model.items()} for t in tasks},
    }


def reused_teacher_scores(
    path: Path, tasks: list[str], source: str | Path | None, limit: int | None, num_fewshot: int | None
) -> dict[str, Any]:
    """The teacher's benchmark scores from an earlier eval.json at `path`, for `--teacher-scores`.

    They stand for this evaluation's only if they were measured alike: the same benchmark data, item
    limit and few-shot setting, and every task of `tasks` scored for the teacher.
    """
    try:
        bench = json.loads(path.read_text()).get("benchmarks", {})
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KdistillError(f"--teacher-scores {path}: cannot be read as eval.json ({err})") from None
    for key, wanted in (("data_dir", str(source)), ("limit", limit), ("num_fewshot", num_fewshot)):
        if bench.get(key) != wanted:
            raise KdistillError(
                f"--teacher-scores {path}: benchmarks.{key} is {bench.get(key)!r} there and {wanted!r} here; "
                "the teacher's scores are reused only from an evaluation with the same settings"
            )
    found = bench.get("tasks", {})
    missing = [t for t in tasks if "teacher" not in found.get(t, {})]
    if missing:
        raise KdistillError(f"--teacher-scores {path}: no teacher scores for {', '.join(missing)}")
    return {t: found[t]["teacher"] for t in tasks}


def _each_model(models: EvalModels) -> list[tuple[str, Any, Any]]:
    """`(who, model, its tokenizer)` for the student and, when there is one, the teacher."""
    pairs = [("student", models.student, models.tokenizer)]
    if models.teacher is not None:
        pairs.append(("teacher", models.teacher, models.teacher_tokenizer or models.tokenizer))
    return pairs


def kept_shares(result: dict[str, Any]) -> dict[str, float | None]:
    """`{metric: share}` for every metric both models have; benchmark metrics are `TASK/acc` etc.

    A benchmark's share is measured above chance (`kept_above_chance`), and is None where the teacher is
    within two standard errors of chance (or the task's chance level is unknown): not meaningful.
    """
    shares: dict[str, float | None] = {}
    held = result.get("held_out", {})
    if "teacher" in held:
        # Perplexities over different tokenizers count different tokens: no share of one in the other.
        shared = held.get("tokenizers", "shared") == "shared"
        for metric in ("ppl", "top1", "rouge_l") if shared else ("rouge_l",):
            if metric in held["student"]:
                teacher_value = held["teacher"].get(metric, 1.0)  # top-1: the teacher agrees with itself
                shares[metric] = kept(metric, held["student"][metric], teacher_value)
    for task, scores in result.get("benchmarks", {}).get("tasks", {}).items():
        if "teacher" not in scores:
            continue
        for metric in ("acc", "acc_norm"):
            if metric in scores["student"]:
                teacher = scores["teacher"]
                stderr = teacher.get(f"{metric}_stderr", math.inf)
                shares[f"{task}/{metric}"] = (
                    None
                    if task not in CHANCE
                    else kept_above_chance(scores["student"][metric], teacher[metric], CHANCE[task], stderr)
                )
    return shares


def mean_kept(shares: dict[str, float | None]) -> float | None:
    """The mean share kept over the benchmark accuracies (acc_norm where a task has it)."""
    picked = {}
    for key, value in shares.items():
        if "/" in key and value is not None:
            task, metric = key.split("/")
            if metric == "acc_norm" or task not in picked:
                picked[task] = value
    return sum(picked.values()) / len(picked) if picked else None


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write `data` as JSON atomically (a temporary file renamed over the target)."""
    write_atomic(path, json.dumps(_finite(data), indent=2))


def _finite(value: Any) -> Any:
    # JSON has no NaN or infinity; a metric that could not be computed is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
