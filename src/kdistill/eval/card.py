"""The model card of a run folder: `README.md` in the Hub's format, written after training and updated
by `kdistill eval`.

The YAML front matter and its `model-index` are made by `huggingface_hub`'s own `ModelCardData` and
`EvalResult`, so the Hub reads them as it reads any card; the text says what was distilled from what,
with which loss, how long it trained, what it kept on held-out rows, how to load it and how to train it
again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kdistill.config import RunConfig, load_config
from kdistill.errors import KdistillError
from kdistill.files import RunFiles, write_atomic
from kdistill.models.build import teacher_source

log = logging.getLogger("kdistill")

CARD = "README.md"


def write_card(run_dir: str | Path) -> Path:
    """Write (or rewrite) `README.md` in `run_dir` from its config, summary and any eval.json."""
    from huggingface_hub import ModelCard

    run_dir = Path(run_dir)
    if not (run_dir / RunFiles.CONFIG).is_file():
        raise KdistillError(f"{run_dir}: not a kdistill run folder (no {RunFiles.CONFIG} in it)")
    cfg = load_config(run_dir / RunFiles.CONFIG)
    summary = _read(run_dir / RunFiles.SUMMARY)
    evaluation = _read(run_dir / RunFiles.EVAL)
    data = _card_data(cfg, run_dir, evaluation)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_text(cfg, run_dir, summary, evaluation)}")
    write_atomic(run_dir / CARD, str(card))
    return run_dir / CARD


def card_after(run_dir: Path) -> None:
    """`write_card` at the end of a command whose real work is done: a card that fails warns only."""
    try:
        write_card(run_dir)
    except Exception as err:  # the student and its results are saved already: say what failed, go on
        log.warning("the model card could not be written (%s)", err)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repository id (`owner/name`), not a local path or a package."""
    if not name or name.startswith(("package:", "builtin:", "/", ".", "~")) or Path(name).exists():
        return None
    return name if name.count("/") == 1 else None


def _card_data(cfg: RunConfig, run_dir: Path, evaluation: dict[str, Any]) -> Any:
    from huggingface_hub import ModelCardData

    base = _hub_id(cfg.student.model) or _hub_id(cfg.teacher.model)
    return ModelCardData(
        base_model=base,
        datasets=[d for d in (_hub_id(cfg.data.source),) if d] or None,
        library_name="peft" if (run_dir / "adapter_config.json").is_file() else "transformers",
        pipeline_tag="text-generation",
        license=_license(cfg),
        tags=["distillation", "knowledge-distillation", "kdistill"],
        model_name=run_dir.name,
        eval_results=_eval_results(evaluation) or None,
    )


def _license(cfg: RunConfig) -> str | None:
    """The licence the student's or teacher's own model card states, when a local folder has one."""
    from huggingface_hub import ModelCard

    for name in (cfg.student.model, cfg.teacher.model):
        try:
            folder = Path(teacher_source(cfg.teacher).path) if name == cfg.teacher.model else Path(str(name))
            if (folder / CARD).is_file():
                return ModelCard.load(folder / CARD).data.license
        except Exception:  # a licence is a courtesy: a card that cannot be read simply gives none
            continue
    return None


def _eval_results(evaluation: dict[str, Any]) -> list[Any]:
    """The student's benchmark accuracies and held-out perplexity as the Hub's `EvalResult`s."""
    from huggingface_hub import EvalResult

    results = []
    for task, scores in evaluation.get("benchmarks", {}).get("tasks", {}).items():
        accuracy = scores.get("student", {}).get("acc")
        if accuracy is not None:
            results.append(
                EvalResult(
                    task_type="text-generation", dataset_type=task, dataset_name=task,
                    metric_type="accuracy", metric_value=round(float(accuracy), 4),
                )
            )  # fmt: skip
    held_out = evaluation.get("held_out", {})
    ppl = held_out.get("student", {}).get("ppl")
    if ppl is not None:
        name = Path(str(held_out.get("source") or "held-out")).name
        results.append(
            EvalResult(
                task_type="text-generation", dataset_type="held-out", dataset_name=name,
                metric_type="perplexity", metric_value=round(float(ppl), 4),
            )
        )  # fmt: skip
    return results


def _text(cfg: RunConfig, run_dir: Path, summary: dict[str, Any], evaluation: dict[str, Any]) -> str:
    teacher = cfg.teacher.model or cfg.teacher.cache
    student = cfg.student.model or _made_from_teacher(cfg)
    loss = cfg.loss
    lines = [
        f"# {run_dir.name}",
        "",
        f"A student distilled with [kdistill](https://pypi.org/project/kdistill/) from the teacher "
        f"`{teacher}`. Student: {student}, trained {cfg.student.finetune}"
        + (" (LoRA)" if cfg.student.finetune == "lora" else "")
        + f", on `{cfg.data.source}`.",
        "",
        "## Training",
        "",
        f"- loss: `{loss.divergence}` at temperature {loss.temperature:g}, alpha {loss.alpha:g} "
        f"(alpha x KL x T^2 + (1 - alpha) x CE over response tokens)",
        f"- on-policy share (lmbda): {cfg.training.on_policy.lmbda:g}",
        f"- learning rate {cfg.training.learning_rate:g}, batch {cfg.training.batch_size} x "
        f"{cfg.training.gradient_accumulation_steps} accumulation",
    ]
    if summary:
        lines.append(f"- {summary['steps']} optimizer steps in {summary['seconds'] / 60:.1f} minutes")
    lines += _held_out_table(summary)
    lines += _benchmark_table(evaluation)
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{run_dir.name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{run_dir.name}")',
        "```",
        "",
        f"For llama.cpp and Ollama: `kdistill export {run_dir.name} --gguf --type q8_0`.",
        "",
        "## Reproduce",
        "",
        "```bash",
        f"kdistill train {run_dir.name}/{RunFiles.CONFIG} --overwrite",
        "```",
        "",
    ]
    return "\n".join(lines)


def _made_from_teacher(cfg: RunConfig) -> str:
    made = cfg.student.from_teacher
    return f"made from the teacher ({made.num_layers} layers)" if made is not None else "?"


def _held_out_table(summary: dict[str, Any]) -> list[str]:
    before, after = summary.get("before", {}), summary.get("after", {})
    rows = [(k, label) for k, label in (("kl", "KL to teacher"), ("ppl", "perplexity")) if k in after]
    if not rows:
        return []
    lines = ["", "## Held-out rows", "", "| | before training | after |", "|---|---|---|"]
    for key, label in rows:
        lines.append(f"| {label} | {before.get(key, float('nan')):.4g} | {after[key]:.4g} |")
    return lines


def _benchmark_table(evaluation: dict[str, Any]) -> list[str]:
    tasks = evaluation.get("benchmarks", {}).get("tasks", {})
    if not tasks:
        return []
    lines = ["", "## Benchmarks (`kdistill eval`)", "", "| task | student | teacher |", "|---|---|---|"]
    for task, scores in tasks.items():
        s, t = scores.get("student", {}), scores.get("teacher", {})
        lines.append(f"| {task} | {_accuracy(s)} | {_accuracy(t)} |")
    return lines


def _accuracy(scores: dict[str, Any]) -> str:
    if scores.get("acc") is None:
        return "-"
    error = scores.get("acc_stderr")
    return f"{scores['acc']:.3f}" + (f" ± {error:.3f}" if error is not None else "")
