"""Benchmarks through lm-evaluation-harness, used as a library on an already-loaded model.

lm-eval scores each choice by the log-likelihood of its text after the prompt; `acc` takes the
likeliest choice, `acc_norm` the likeliest per character. Standard errors are lm-eval's own (the
sample standard error of the mean of per-item 0/1 scores).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kdistill.errors import KdistillError
from kdistill.eval.tasks import task_configs

log = logging.getLogger("kdistill")


def run_benchmarks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    data_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Accuracies of `model` on `tasks`: `{task: {"acc", "acc_stderr", ["acc_norm", ...], "n"}}`.

    `model` is a loaded causal LM (a `PreTrainedModel`, LoRA already merged); `limit` evaluates the
    first N items of each task.
    """
    if not tasks:
        return {}
    lm_eval, hflm, task_manager = _import_lm_eval()
    configs = task_configs(tasks, data_dir)
    lm = hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    was_training = model.training
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=configs,
        task_manager=task_manager(include_defaults=False),  # our tasks only; skips indexing ~200 folders
        limit=limit,
        num_fewshot=num_fewshot,
        bootstrap_iters=1000,  # `mean` has a closed-form standard error; this only enables stderrs
        log_samples=False,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    model.train(was_training)
    return {name: _scores(results, f"kdistill_{name}") for name in tasks}


def _scores(results: dict[str, Any], key: str) -> dict[str, float]:
    raw = results["results"][key]
    scores: dict[str, float] = {}
    for metric in ("acc", "acc_norm"):
        if f"{metric},none" in raw:
            scores[metric] = float(raw[f"{metric},none"])
            stderr = raw.get(f"{metric}_stderr,none")
            scores[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, int | float) else float("nan")
    scores["n"] = float(results["n-samples"][key]["effective"])
    return scores


def _import_lm_eval() -> tuple[Any, Any, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise KdistillError(
            f"benchmarks need lm-evaluation-harness ({err}); install it with: pip install 'kdistill[eval]'"
        ) from None
    # lm-eval logs every request batch and a warning per pre-loaded model at INFO/WARNING.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return lm_eval, HFLM, TaskManager
