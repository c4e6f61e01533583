"""Held-out metrics of what the student kept: perplexity, KL and top-1 agreement with the teacher,
ROUGE-L of greedy generations against the reference responses, and the share of the teacher kept.

One pass gives every held-out number: per batch the teacher's forward (as training runs it, under
inference mode, stopping at its final hidden states at the response rows) and the student's, then
each chunk of rows goes through both heads once for the student's cross-entropy, its KL to the
teacher, top-1 agreement and the teacher's own cross-entropy. The formulas are the training loss's,
at T = 1, so the numbers match the training loop's evaluation (`objective.quality.held_out_quality`).
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
from kdistill.losses.chunked import chunk_rows
from kdistill.losses.divergences import forward_kl
from kdistill.losses.signal import softcap_logits
from kdistill.models.parts import base_model, output_head, softcap
from kdistill.objective.batch import StudentLoss
from kdistill.objective.quality import held_out_quality, perplexity
from kdistill.teacher.live import LiveTeacher, live_teacher
from kdistill.teacher.responses import generate

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


def held_out_sums(
    hidden: Tensor,
    head: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    teacher: Dense | DenseHidden | None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    student_softcap: float | None = None,
    sequence: Tensor | None = None,
) -> Tensor:
    """`(S, 4)` sums of `(ce, kl, teacher_ce, top1)` per sequence, each token's logits made once for all
    four.

    Args:
        hidden: `(N, H)` student final hidden states at the trained tokens; token i predicts `labels[i]`.
        head, bias: the student's `(V, H)` output head and optional `(V,)` bias.
        labels: `(N,)` next-token ids.
        teacher: the teacher's signal for the same N tokens; without it `kl`, `teacher_ce` and `top1`
            are 0.
        chunk_size: tokens per chunk, so no `(N, V)` logit matrix is held; `None` does all at once.
        sequence: `(N,)` the sequence (`0 .. S - 1`, in order) each token belongs to; without it the N
            tokens are one sequence (S = 1).
    KL(teacher || student) and both cross-entropies are at T = 1, with the training loss's formulas;
    `top1` counts the tokens where student and teacher have the same arg-max token.
    """
    n = hidden.shape[0]
    if sequence is None:
        sequence = torch.zeros(n, dtype=torch.long, device=hidden.device)
    sums = torch.zeros(int(sequence.max()) + 1 if n else 1, 4, dtype=torch.float64, device=hidden.device)
    step = chunk_rows(chunk_size or max(n, 1), head.shape[0], hidden.device)
    for start in range(0, n, step):
        end = min(start + step, n)
        z = softcap_logits(F.linear(hidden[start:end], head, bias).float(), student_softcap)
        target, seq = labels[start:end, None], sequence[start:end]
        sums[:, 0].index_add_(0, seq, (torch.logsumexp(z, -1) - z.gather(-1, target).squeeze(-1)).double())
        if teacher is None:
            continue
        t = teacher.rows(start, end)
        # The training loss's KL is a sum: taken once per run of one sequence's tokens in this chunk.
        ids, counts = torch.unique_consecutive(seq, return_counts=True)
        ends = counts.cumsum(0)
        for s, a, b in zip(ids.tolist(), (ends - counts).tolist(), ends.tolist()):
            sums[s, 1] += forward_kl(z[a:b], t[a:b])
        sums[:, 2].index_add_(0, seq, (torch.logsumexp(t, -1) - t.gather(-1, target).squeeze(-1)).double())
        sums[:, 3].index_add_(0, seq, (z.argmax(-1) == t.argmax(-1)).double())
    return sums


def ratio_stderr(values: Tensor, tokens: Tensor) -> float:
    """The standard error of a per-token mean `sum(values) / sum(tokens)` over sequences, each
    sequence one sample (its tokens are not independent): the ratio estimator's linearised variance,
    `sqrt(m / (m - 1) * sum_i (v_i - r n_i)^2) / sum_i n_i` over the m sequences with tokens (Cochran
    1977, 6.3). NaN for fewer than two sequences.
    """
    keep = tokens > 0
    m, total = int(keep.sum()), float(tokens.sum())
    if m < 2:
        return float("nan")
    residual = values[keep] - values.sum() / total * tokens[keep]
    return math.sqrt(m / (m - 1) * float((residual**2).sum())) / total


@torch.inference_mode()
def held_out_metrics(
    student: nn.Module,
    teacher: nn.Module | None,
    rows: list[Tokenized],
    pad_id: int,
    batch_size: int = 8,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
    teacher_cache: dict[int, DenseHidden] | None = None,
    cross: CrossTeacher | None = None,
    progress: str | None = None,
) -> tuple[dict[str, float], dict[str, float] | None]:
    """The student's and the teacher's metrics on the response tokens of `rows`, from one pass.

    The student's are `{"ce", "ppl", "tokens"}`, plus `"kl"` (to the teacher) and `"top1"` (agreement
    with it) with a teacher. The teacher's, `{"ce", "ppl", "tokens"}`, come from the same forward pass
    and head as its KL (None without a teacher). Each mean has its standard error beside it as
    `KEY_stderr`, with the held-out row as the sample (`ratio_stderr`). `teacher_cache` keeps the
    teacher's outputs per batch, so several students evaluated on the same rows run the teacher once.
    With `cross` (a teacher of another tokenizer; `rows` then carry its views as "teacher"), `"kl"` is
    the aligned KL of training, without a standard error; top-1 agreement, which needs one vocabulary,
    is not reported, and neither is the teacher's own perplexity, which is per teacher token (run it on
    the teacher's own rows). `progress` names a progress bar over the batches.
    """
    if cross is not None:
        return _aligned_metrics(student, teacher, rows, pad_id, batch_size, chunk_size, cross, progress), None
    cache = {} if teacher_cache is None else teacher_cache
    head, bias = output_head(student, vocab_size)
    decoder, cap = base_model(student).get_decoder(), softcap(student)
    was_training = student.training
    student.eval()
    per_row, row_tokens = [], []  # per held-out row: its four sums and its response tokens
    batches = _batches(rows, pad_id, batch_size)
    for index, batch in enumerate(tqdm(batches, desc=progress, unit="batch", disable=progress is None)):
        mask, targets = trained_rows(batch["labels"])
        if not mask.any():
            continue
        signal = None
        if teacher is not None:
            if index not in cache:
                cache[index] = live_teacher(teacher, batch, mask, vocab_size)[0]
            signal = cache[index]
        ids, attention = batch["input_ids"], batch["attention_mask"]
        final = decoder(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
        row = mask.nonzero()[:, 0]  # the batch row of each trained token, in the order `[mask]` takes them
        sums = held_out_sums(final[:, :-1][mask], head, bias, targets, signal, chunk_size, cap, row)
        per_row.append(sums.cpu())
        row_tokens.append(mask.sum(1)[: sums.shape[0]].double().cpu())
    student.train(was_training)
    if not per_row:
        return {}, None
    return _per_token(torch.cat(per_row), torch.cat(row_tokens), with_teacher=teacher is not None)


def _per_token(
    sums: Tensor, tokens: Tensor, with_teacher: bool
) -> tuple[dict[str, float], dict[str, float] | None]:
    """`held_out_metrics`' two dicts from `(R, 4)` per-row sums and `(R,)` token counts: per-token means
    and their standard errors over rows (`ratio_stderr`); a perplexity's is `ppl * stderr(ce)`."""
    total = float(tokens.sum())

    def mean_and_error(column: int) -> tuple[float, float]:
        return float(sums[:, column].sum()) / total, ratio_stderr(sums[:, column], tokens)

    (ce, ce_err), (kl, kl_err), (t_ce, t_ce_err), (top1, top1_err) = map(mean_and_error, range(4))
    metrics = {"ce": ce, "ppl": perplexity(ce), "tokens": total, "ce_stderr": ce_err}
    metrics["ppl_stderr"] = metrics["ppl"] * ce_err
    if not with_teacher:
        return metrics, None
    own = {"ce": t_ce, "ppl": perplexity(t_ce), "tokens": total, "ce_stderr": t_ce_err}
    own["ppl_stderr"] = own["ppl"] * t_ce_err
    return metrics | {"kl": kl, "kl_stderr": kl_err, "top1": top1, "top1_stderr": top1_err}, own


def _aligned_metrics(
    student: nn.Module,
    teacher: nn.Module,
    rows: list[Tokenized],
    pad_id: int,
    batch_size: int,
    chunk_size: int | None,
    cross: CrossTeacher,
    progress: str | None,
) -> dict[str, float]:
    """The student's CE, perplexity and aligned KL to a teacher of another tokenizer, as training
    evaluates them."""
    teachers = [LiveTeacher(name="teacher", weight=1.0, model=teacher, mapping=cross.mapping)]
    batches = _batches(rows, pad_id, batch_size, {"teacher": cross.pad_id})
    wrapped = StudentLoss(student)
    return held_out_quality(
        wrapped, teachers, batches, chunk_size, None, alignment=cross.alignment, progress=progress
    )


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
    model: nn.Module,
    tokenizer: Any,
    examples: list[Example],
    max_new_tokens: int,
    batch_size: int = 8,
    label: str = "generating",
) -> list[str]:
    """The model's greedy response to each example's prompt (the reference response is not shown);
    `label` names the progress bar."""
    if not examples:
        return []
    was_training = model.training
    model.eval()
    texts = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size, label)
    model.train(was_training)
    return texts
