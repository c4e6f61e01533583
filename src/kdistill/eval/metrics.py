"""Held-out metrics of what the student kept: perplexity, KL and top-1 agreement with the teacher,
ROUGE-L of greedy generations against the reference responses, and the share of the teacher kept.

Perplexity, cross-entropy and KL come from `held_out_quality`, the chunked loss the training loop
evaluates with; top-1 agreement reuses the hidden states and teacher outputs of that same pass.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill.data import Collator, Example, Tokenized, trained_rows
from kdistill.losses import DEFAULT_CHUNK_SIZE, Dense, DenseHidden, VocabMap
from kdistill.models.parts import output_head
from kdistill.objective.batch import StudentLoss
from kdistill.objective.quality import held_out_quality, perplexity
from kdistill.teacher.forward import TeacherOutputs
from kdistill.teacher.responses import generate
from kdistill.teacher.roster import Teacher

# Whether a larger value of a metric is better; `kept` turns each into "share of the teacher's".
HIGHER_IS_BETTER = {"ppl": False, "ce": False, "kl": False, "top1": True, "rouge_l": True, "acc": True}


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one prediction against one reference (Lin 2004), via `rouge-score`."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def mean_rouge_l(predictions: list[str], references: list[str]) -> float:
    if not predictions:
        return float("nan")
    scorer = _rouge_scorer()
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return sum(scores) / len(scores)


@functools.cache
def _rouge_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        from kdistill.errors import KdistillError

        raise KdistillError("ROUGE-L needs rouge-score: pip install 'kdistill[eval]'") from None
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs its tokenizer choice at INFO
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def kept(metric: str, student: float, teacher: float) -> float | None:
    """The share of the teacher's quality the student kept on `metric` (1.0 = all of it).

    Higher-is-better metrics: student / teacher. Perplexity: teacher / student. KL has no share
    (the teacher's own KL is 0); top-1 agreement is already a share of the teacher's choices.
    """
    if metric == "top1":
        return student
    if metric == "kl" or not (math.isfinite(student) and math.isfinite(teacher)):
        return None
    higher = HIGHER_IS_BETTER.get(metric.removesuffix("_norm"), True)
    numerator, denominator = (student, teacher) if higher else (teacher, student)
    return numerator / denominator if denominator > 0 else None


def kept_above_chance(student: float, teacher: float, chance: float, teacher_stderr: float) -> float | None:
    """The share of the teacher's lead over chance that the student kept.

    `(student - chance) / (teacher - chance)`, accuracies both. A student at chance keeps 0, one below
    chance a negative share. None where the teacher is within two standard errors of chance: its
    accuracy is then indistinguishable from guessing, and any share of it would be noise.
    """
    if not (math.isfinite(student) and math.isfinite(teacher)):
        return None
    lead = teacher - chance
    if lead <= 2 * (teacher_stderr if math.isfinite(teacher_stderr) else math.inf):
        return None
    return (student - chance) / lead


@torch.no_grad()
def top1_matches(
    hidden: Tensor,
    head: Tensor,
    bias: Tensor | None,
    teacher: Dense | DenseHidden,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> int:
    """How many of N rows have the same arg-max token for student and teacher.

    Args:
        hidden: `(N, H)` student final hidden states at the trained rows.
        head, bias: the student's `(V, H)` output head and optional `(V,)` bias.
        teacher: the teacher's signal for the same N rows.
        chunk_size: rows per chunk, so no `(N, V)` logit matrix is held; `None` does all at once.
    A final-logit soft-cap is monotonic, so it never changes the arg-max and is not applied.
    """
    step = chunk_size or max(hidden.shape[0], 1)
    matches = 0
    for start in range(0, hidden.shape[0], step):
        end = min(start + step, hidden.shape[0])
        student_top = F.linear(
            hidden[start:end].float(), head.float(), None if bias is None else bias.float()
        )
        matches += int((student_top.argmax(-1) == teacher.rows(start, end).argmax(-1)).sum())
    return matches


class _KeepFinal(StudentLoss):
    """The student as `held_out_quality` calls it, keeping the last batch's final states for top-1."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.last: Tensor | None = None

    def keep_final(self, final: Tensor) -> Tensor:
        self.last = final
        return final


def held_out_metrics(
    student: nn.Module,
    teacher: nn.Module | None,
    rows: list[Tokenized],
    pad_id: int,
    batch_size: int = 8,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
    teacher_cache: dict[int, TeacherOutputs] | None = None,
    cross: CrossTeacher | None = None,
    progress: str | None = None,
) -> dict[str, float]:
    """`{"ce", "ppl", "tokens"}` on the response tokens of `rows`, plus `"kl"` and `"top1"` with a teacher.

    `teacher_cache` keeps the teacher's outputs per batch, so several students evaluated on the same
    rows run the teacher once. Batches go through `held_out_quality` one at a time, so that top-1
    agreement reads each batch's hidden states and teacher outputs before the next batch replaces them.
    With `cross` (a teacher of another tokenizer; `rows` then carry its views as "teacher"), `"kl"` is
    the aligned KL of training and top-1 agreement, which needs one vocabulary, is not reported.
    `progress` names a progress bar over the batches.
    """
    wrapped = _KeepFinal(student)
    cache = {} if teacher_cache is None or cross is not None else teacher_cache
    head, bias = output_head(student, vocab_size)
    mapping = cross.mapping if cross is not None else None
    teachers = [Teacher("teacher", 1.0, model=teacher, mapping=mapping)] if teacher is not None else []
    pads = {"teacher": cross.pad_id} if cross is not None else {}
    alignment = cross.alignment if cross is not None else "span"
    totals = {"ce": 0.0, "kl": 0.0, "top1": 0.0, "tokens": 0.0}
    batches = _batches(rows, pad_id, batch_size, pads)
    for index, batch in enumerate(tqdm(batches, desc=progress, unit="batch", disable=progress is None)):
        one = {0: cache[index]} if index in cache else {}  # held_out_quality's memo of one batch
        result = held_out_quality(
            wrapped, teachers, [batch], chunk_size, vocab_size, one, alignment=alignment
        )
        if not result:
            continue
        for key in ("ce", "kl"):
            totals[key] += result.get(key, 0.0) * result["tokens"]  # per-token means back to sums
        totals["tokens"] += result["tokens"]
        if teachers and cross is None:
            cache[index] = one[0]
            mask, _ = trained_rows(batch["labels"])
            totals["top1"] += top1_matches(wrapped.last[:, :-1][mask], head, bias, one[0].signal, chunk_size)
    if totals["tokens"] == 0:
        return {}
    mean = {k: v / totals["tokens"] for k, v in totals.items() if k != "tokens"}
    metrics = {"ce": mean["ce"], "ppl": perplexity(mean["ce"]), "tokens": totals["tokens"]}
    if teacher is None:
        return metrics
    return metrics | ({"kl": mean["kl"]} if cross is not None else {"kl": mean["kl"], "top1": mean["top1"]})


@dataclass(frozen=True)
class CrossTeacher:
    """A teacher of another tokenizer in evaluation: its vocabulary map, pad id and `loss.alignment`."""

    mapping: VocabMap
    pad_id: int
    alignment: str = "span"


def _batches(
    rows: list[Tokenized], pad_id: int, batch_size: int, teacher_pads: dict[str, int] | None = None
) -> list[dict[str, Tensor]]:
    # Sorted by length, so each batch carries almost no padding; the order never changes between calls,
    # which is what lets `teacher_cache` match batches by index.
    ordered = sorted(rows, key=lambda row: len(row.input_ids))
    collate = Collator(pad_id, teacher_pads=teacher_pads or {})
    return [collate(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size)]


def greedy_responses(
    model: nn.Module, tokenizer: Any, examples: list[Example], max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """The model's greedy response to each example's prompt (the reference response is not shown)."""
    if not examples:
        return []
    was_training = model.training
    model.eval()
    texts = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size)
    model.train(was_training)
    return texts
