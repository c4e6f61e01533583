"""lm-eval on a tiny model: its accuracies equal a plain log-likelihood reference, item by item."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdistill.eval.harness import continuation_lm, run_benchmarks

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'kdistill[eval]')")

QUESTIONS = [
    ("Question: which is red?", ["apple", "sun water", "the moon", "blue car"]),
    ("Question: name a city", ["river", "city of music", "dog", "green pear"]),
    ("Question: what do cats like?", ["water", "the sun and the moon", "music book", "a"]),
    ("Question: list three fruits", ["apple pear", "car", "blue", "one two three"]),
    ("Question: where is the book?", ["in the city", "on the moon", "with the dog", "at the river"]),
]
WINO = [
    (["the cat sat by the dog so the cat", "the cat sat by the dog so the dog"], "was happy."),
    (["the sun and the moon, but the sun", "the sun and the moon, but the moon"], "is red."),
    (["a car and a book, so the car", "a car and a book, so the book"], "was blue."),
]


def _loglikelihood(model: torch.nn.Module, tokenizer: object, context: str, continuation: str) -> float:
    """log p(continuation | context), with the context/continuation token split lm-eval uses."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0, :-1], -1)
    targets = ids[0, len(context_ids) :]
    return float(logprobs[len(context_ids) - 1 :].gather(1, targets[:, None]).sum())


def _mean_stderr(scores: list[float]) -> float:
    mean = sum(scores) / len(scores)
    return math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1) / len(scores))


def test_accuracies_match_a_log_likelihood_reference(tiny: dict, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    model = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    arc_rows, acc, acc_norm = [], [], []
    for i, (question, choices) in enumerate(QUESTIONS):
        lls = [_loglikelihood(model, tokenizer, question + "\nAnswer:", " " + c) for c in choices]
        best = max(range(4), key=lambda c: lls[c])
        # Gold is the model's own pick for the first three items and another choice for the last two,
        # so the expected accuracy is exactly 3/5, whatever the random weights.
        gold = best if i < 3 else (best + 1) % 4
        best_norm = max(range(4), key=lambda c: lls[c] / len(" " + choices[c]))  # lm-eval: per character
        arc_rows.append({"query": question, "choices": choices, "gold": gold})
        acc.append(float(best == gold))
        acc_norm.append(float(best_norm == gold))
    wino_rows, wino_acc = [], []
    for i, (contexts, continuation) in enumerate(WINO):
        lls = [_loglikelihood(model, tokenizer, c, " " + continuation) for c in contexts]
        best = int(lls[1] > lls[0])
        gold = best if i < 2 else 1 - best  # 2 of 3 right
        wino_rows.append({"context_options": contexts, "continuation": continuation, "gold": gold})
        wino_acc.append(float(best == gold))
    for name, rows in (("arc_easy", arc_rows), ("winogrande", wino_rows)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    got = run_benchmarks(model, tokenizer, ["arc_easy", "winogrande"], tmp_path, batch_size=2)
    assert acc == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert got["arc_easy"]["acc"] == pytest.approx(0.6)
    assert got["arc_easy"]["acc_stderr"] == pytest.approx(_mean_stderr(acc))
    assert got["arc_easy"]["acc_norm"] == pytest.approx(sum(acc_norm) / 5)
    assert got["arc_easy"]["n"] == 5
    assert got["winogrande"]["acc"] == pytest.approx(2 / 3) and wino_acc == [1.0, 1.0, 0.0]
    assert got["winogrande"]["acc_stderr"] == pytest.approx(_mean_stderr(wino_acc))
    assert "acc_norm" not in got["winogrande"]

    limited = run_benchmarks(model, tokenizer, ["arc_easy"], tmp_path, limit=3)
    assert limited["arc_easy"]["n"] == 3 and limited["arc_easy"]["acc"] == 1.0


def test_scoring_only_the_continuation_gives_lm_evals_own_loglikelihoods(
    tiny: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lm_eval.models.huggingface import HFLM

    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    model = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    # max_length 24 cuts the long context from the left; batches of 3 mix lengths and padding.
    common = {"pretrained": model, "tokenizer": tokenizer, "batch_size": 3, "max_length": 24}
    plain, fast = HFLM(**common), continuation_lm(HFLM)(**common)
    pairs = [(q + "\nAnswer:", " " + c) for q, choices in QUESTIONS for c in choices]
    pairs += [(c, " " + k) for contexts, k in WINO for c in contexts]
    pairs += [("the cat", " a"), ("the cat", " the"), (" ".join(["the dog and the cat"] * 8), " sat.")]
    requests = [((c, k), *plain._encode_pair(c, k)) for c, k in pairs]
    # Token 0 is also the padding lm-eval appends: a continuation ending in it, and one whose input
    # is another request's input plus a 0, must still be scored where lm-eval reads them.
    pad = tokenizer.pad_token_id
    assert pad == 0
    requests += [(("", ""), [5, 6], [7]), (("", ""), [5, 6], [pad, 8]), (("", ""), [9, 5], [6, pad, pad])]
    widths = []
    call = fast._model_call

    def spy(inps: torch.Tensor, *args: object) -> torch.Tensor:
        logits = call(inps, *args)
        widths.append((inps.shape[1], logits.shape[1]))
        return logits

    monkeypatch.setattr(fast, "_model_call", spy)
    expected = plain._loglikelihood_tokens(requests, disable_tqdm=True)
    got = fast._loglikelihood_tokens(requests, disable_tqdm=True)
    # The same body and the same head rows; a head over fewer rows may take another BLAS blocking with
    # several threads, so equal to float32 rounding rather than bit for bit.
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], rel=1e-6, abs=1e-5)
    assert any(width < length for length, width in widths)  # the narrow path was taken
