"""What a model's own answers look like: their length, their repetition, and how likely the teacher
finds them (the teacher's mean per-token NLL of them as responses to the prompts, what on-policy
distillation lowers)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kdistill.data import Example, tokenize_examples
from kdistill.eval.metrics import held_out_metrics
from kdistill.losses import DEFAULT_CHUNK_SIZE


def repeated_4grams(text: str) -> float:
    """The share of a text's word 4-grams that already occurred earlier in it (0 for under 4 words)."""
    words = text.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def answer_shape(texts: list[str]) -> dict[str, float]:
    """`{"answer_words": mean words an answer, "rep4": mean share of repeated word 4-grams}`."""
    if not texts:
        return {}
    return {
        "answer_words": sum(len(t.split()) for t in texts) / len(texts),
        "rep4": sum(map(repeated_4grams, texts)) / len(texts),
    }


def teacher_nll(
    teacher: nn.Module,
    tokenizer: Any,
    examples: list[Example],
    answers: list[str],
    max_length: int,
    batch_size: int = 8,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[float, float]:
    """The teacher's mean per-token NLL (nats) of `answers` as the responses to `examples`' prompts,
    through its own tokenizer and chat template, and its standard error over answers; NaN without an
    answer token."""
    rows, _ = tokenize_examples(
        [Example(e.prompt, a) for e, a in zip(examples, answers)], tokenizer, max_length
    )
    if not rows:
        return float("nan"), float("nan")
    own, _ = held_out_metrics(
        teacher, None, rows, tokenizer.pad_token_id, batch_size, chunk_size, progress="teacher NLL of answers"
    )
    return own["ce"], own["ce_stderr"]
