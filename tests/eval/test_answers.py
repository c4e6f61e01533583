"""The shape of a model's answers (length, repeated 4-grams) by hand, and the teacher's NLL of them
against a plain full-logits reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import dolly_rows
from kdistill.data import tokenize_examples
from kdistill.data.formats import Example, to_examples
from kdistill.eval.answers import answer_shape, repeated_4grams, teacher_nll


def test_repeated_4grams_and_answer_shape_by_hand() -> None:
    # 8 words, 5 four-grams: "a b c d" comes back once.
    assert repeated_4grams("a b c d a b c d") == pytest.approx(1 / 5)
    assert repeated_4grams("The China, The China, The China, The China,") == pytest.approx(3 / 5)
    assert repeated_4grams("one two three four five") == 0.0 and repeated_4grams("too short") == 0.0
    shape = answer_shape(["a b c d a b c d", "one two"])
    assert shape == {"answer_words": 5.0, "rep4": pytest.approx(0.1)}
    assert answer_shape([]) == {}


def test_teacher_nll_matches_a_full_logits_reference(tiny: dict) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    examples = to_examples(dolly_rows(5, seed=4), "dolly", "rows")
    answers = ["a b c", "the answer is four", "yes", "no, not at all", "maybe later"]
    got, stderr = teacher_nll(teacher, tokenizer, examples, answers, 64, batch_size=2, chunk_size=3)
    rows, _ = tokenize_examples([Example(e.prompt, a) for e, a in zip(examples, answers)], tokenizer, 64)
    sums, counts = [], []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row.input_ids])
            labels = torch.tensor(row.labels[1:])
            logits = teacher(input_ids=ids).logits[0, :-1]
            keep = labels != -100
            sums.append(float(F.cross_entropy(logits[keep], labels[keep], reduction="sum")))
            counts.append(int(keep.sum()))
    mean = sum(sums) / sum(counts)
    assert sum(counts) > 5 and got == pytest.approx(mean, rel=1e-4)
    # Its standard error takes each answer as one sample: the ratio estimator's, written out.
    m = len(rows)
    spread = sum((s - mean * n) ** 2 for s, n in zip(sums, counts)) * m / (m - 1)
    assert stderr == pytest.approx(spread**0.5 / sum(counts), rel=1e-3) and stderr > 0
