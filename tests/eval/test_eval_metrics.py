"""Each held-out metric against a value computed by hand or by a plain full-logits reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import dolly_rows
from kdistill.data import tokenize_examples
from kdistill.data.formats import to_examples
from kdistill.eval.metrics import (
    held_out_metrics,
    held_out_sums,
    kept,
    kept_above_chance,
    mean_rouge_l,
    ratio_stderr,
    rouge_l,
)
from kdistill.eval.runner import kept_shares, mean_kept, write_json
from kdistill.eval.tables import eval_table
from kdistill.losses import Dense, DenseHidden
from kdistill.models.even_cut import shrink

pytest.importorskip("rouge_score", reason="rouge-score is not installed (pip install 'kdistill[eval]')")


def test_rouge_l_by_hand() -> None:
    # LCS("the cat sat", "the cat sat on the mat") = 3: precision 3/3, recall 3/6, F = 2PR/(P+R) = 2/3.
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    # LCS("a b c d", "a c b d") = 3 ("a b d" or "a c d"): P = R = F = 3/4.
    assert rouge_l("a b c d", "a c b d") == pytest.approx(0.75)
    assert rouge_l("Same words here.", "same words here") == 1.0  # case and punctuation are ignored
    assert rouge_l("nothing shared", "other text") == 0.0
    assert mean_rouge_l(["the cat sat", "a b c d"], ["the cat sat on the mat", "a c b d"]) == pytest.approx(
        (2 / 3 + 0.75) / 2
    )
    assert math.isnan(mean_rouge_l([], []))


def test_share_kept_by_hand() -> None:
    assert kept("ppl", 20.0, 10.0) == 0.5  # lower is better: teacher / student
    assert kept("acc", 0.6, 0.8) == pytest.approx(0.75)
    assert kept("acc_norm", 0.3, 0.6) == pytest.approx(0.5)
    assert kept("rouge_l", 0.2, 0.25) == pytest.approx(0.8)
    assert kept("top1", 0.4, 1.0) == 0.4  # already a share of the teacher's choices
    assert kept("kl", 0.5, 0.0) is None
    assert kept("acc", 0.5, 0.0) is None and kept("ppl", float("inf"), 3.0) is None


def test_held_out_sums_by_hand() -> None:
    head = torch.eye(3)  # student logits are the hidden states themselves
    hidden = torch.tensor([[1.0, 0, 0], [0, 2, 1], [0, 0, 3], [4, 5, 0]])  # arg-max 0, 1, 2, 1
    teacher = torch.tensor([[5.0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0]])  # arg-max 0, 2, 2, 1
    labels = torch.tensor([0, 1, 2, 0])
    s, t = F.log_softmax(hidden, -1), F.log_softmax(teacher, -1)
    expected = [
        float(-s[range(4), labels].sum()),  # the student's cross-entropy
        float((t.exp() * (t - s)).sum()),  # KL(teacher || student)
        float(-t[range(4), labels].sum()),  # the teacher's cross-entropy
        3.0,  # rows with the same arg-max
    ]
    for chunk in (None, 1, 3):
        got = held_out_sums(hidden, head, None, labels, Dense(teacher), chunk)
        assert got.shape == (1, 4) and got[0].tolist() == pytest.approx(expected, rel=1e-6)
    bias = torch.tensor([0.0, 0.0, 10.0])  # now every student row picks token 2
    assert held_out_sums(hidden, head, bias, labels, Dense(teacher), 2)[0, 3] == 2
    as_hidden = DenseHidden(hidden=teacher, head=torch.eye(3))
    assert held_out_sums(hidden, head, None, labels, as_hidden, 2)[0, 3] == 3
    alone = held_out_sums(hidden, head, None, labels, None, 2)[0]
    assert alone[0] == pytest.approx(expected[0]) and alone[1:].tolist() == [0, 0, 0]
    # Per sequence: tokens 0-1 are one, 2-3 another; chunks of 3 cut the second sequence's run.
    sequence = torch.tensor([0, 0, 1, 1])
    per = held_out_sums(hidden, head, None, labels, Dense(teacher), 3, sequence=sequence)
    first = held_out_sums(hidden[:2], head, None, labels[:2], Dense(teacher[:2]), None)[0]
    assert per.shape == (2, 4) and per[0].tolist() == pytest.approx(first.tolist(), rel=1e-6)
    assert per.sum(0).tolist() == pytest.approx(expected, rel=1e-6)


def test_ratio_stderr_is_the_clustered_standard_error() -> None:
    # Equal-length sequences: the standard error of the mean of the per-sequence means.
    values, tokens = torch.tensor([2.0, 4.0, 6.0, 8.0]), torch.tensor([2.0, 2.0, 2.0, 2.0])
    means = values / tokens
    assert ratio_stderr(values, tokens) == pytest.approx(float(means.std() / 2), rel=1e-6)
    # Sequences without tokens do not count; one sequence has no spread to measure.
    empty = ratio_stderr(torch.tensor([2.0, 4.0, 6.0, 8.0, 0.0]), torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0]))
    assert empty == pytest.approx(ratio_stderr(values, tokens))
    assert math.isnan(ratio_stderr(torch.tensor([3.0]), torch.tensor([3.0])))
    # Every sequence at the same per-token value: no error.
    assert ratio_stderr(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 3.0])) == 0.0


def _reference(student: torch.nn.Module, teacher: torch.nn.Module, rows: list) -> dict[str, float]:
    """Per-token CE, KL(teacher || student) and top-1 agreement from full logits, one row at a time."""
    ce = kl = agree = tokens = 0.0
    row_kl, row_tokens = [], []
    for row in rows:
        ids = torch.tensor([row.input_ids])
        labels = torch.tensor(row.labels[1:])
        keep = labels != -100
        with torch.no_grad():
            s = F.log_softmax(student(ids).logits[0, :-1][keep], -1)
            t = F.log_softmax(teacher(ids).logits[0, :-1][keep], -1)
        ce += float(F.nll_loss(s, labels[keep], reduction="sum"))
        kl += float((t.exp() * (t - s)).sum())
        agree += float((s.argmax(-1) == t.argmax(-1)).sum())
        tokens += int(keep.sum())
        row_kl.append(float((t.exp() * (t - s)).sum()))
        row_tokens.append(int(keep.sum()))
    kl_stderr = ratio_stderr(torch.tensor(row_kl, dtype=torch.float64), torch.tensor(row_tokens).double())
    means = {"ce": ce / tokens, "kl": kl / tokens, "top1": agree / tokens, "tokens": tokens}
    return means | {"kl_stderr": kl_stderr}


def test_held_out_metrics_match_a_full_logits_reference(tiny: dict) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    student = shrink(teacher, 2).eval()  # shares some of the teacher's choices, not all
    rows, _ = tokenize_examples(to_examples(dolly_rows(10, seed=3), "dolly", "rows"), tokenizer, 64)
    expected = _reference(student, teacher, rows)
    cache: dict[int, object] = {}
    got, own = held_out_metrics(student, teacher, rows, tokenizer.pad_token_id, 3, 7, None, cache)
    for key in ("ce", "kl", "top1", "tokens", "kl_stderr"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4), key
    assert 0 < got["ppl_stderr"] < got["ppl"] and 0 < got["top1_stderr"] < 0.5
    assert got["ppl"] == pytest.approx(math.exp(expected["ce"]), rel=1e-4)
    assert 0 < got["top1"] < 1 and len(cache) == 4  # 10 rows in batches of 3
    # The teacher's own perplexity from the same pass equals a pass of the teacher on its own.
    teacher_alone, none = held_out_metrics(teacher, None, rows, tokenizer.pad_token_id, 3, 7)
    assert none is None and own["ce"] == pytest.approx(teacher_alone["ce"], rel=1e-5)
    assert own["tokens"] == teacher_alone["tokens"] and own["ppl"] == pytest.approx(teacher_alone["ppl"])
    teacher.forward = lambda *a, **k: pytest.fail("the cached teacher outputs should be used")
    teacher.model.forward = teacher.forward
    again, _ = held_out_metrics(student, teacher, rows, tokenizer.pad_token_id, 3, 7, None, cache)
    assert again["kl"] == pytest.approx(got["kl"]) and again["top1"] == got["top1"]
    alone, _ = held_out_metrics(student, None, rows, tokenizer.pad_token_id, 3, 7)
    assert set(alone) == {"ce", "ppl", "tokens", "ce_stderr", "ppl_stderr"} and alone["ce"] == pytest.approx(
        got["ce"], rel=1e-5
    )


def test_held_out_metrics_equal_the_training_loops_evaluation(tiny: dict) -> None:
    from kdistill.data import Collator
    from kdistill.objective.batch import StudentLoss
    from kdistill.objective.quality import held_out_quality
    from kdistill.teacher.live import LiveTeacher

    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    student = shrink(teacher, 2).eval()
    rows, _ = tokenize_examples(to_examples(dolly_rows(10, seed=4), "dolly", "rows"), tokenizer, 64)
    ordered = sorted(rows, key=lambda row: len(row.input_ids))
    collate = Collator(tokenizer.pad_token_id)
    batches = [collate(ordered[i : i + 4]) for i in range(0, len(ordered), 4)]
    loop = held_out_quality(
        StudentLoss(student), [LiveTeacher(name="t", weight=1.0, model=teacher)], batches, 7
    )
    got, _ = held_out_metrics(student, teacher, rows, tokenizer.pad_token_id, 4, 7)
    for key in ("ce", "kl", "ppl", "tokens"):
        assert got[key] == pytest.approx(loop[key], rel=1e-5), key


def test_kept_above_chance_with_hand_made_numbers() -> None:
    assert kept_above_chance(0.45, 0.65, 0.25, 0.02) == pytest.approx(0.5)
    assert kept_above_chance(0.25, 0.65, 0.25, 0.02) == 0.0  # a student at chance keeps nothing
    assert kept_above_chance(0.20, 0.65, 0.25, 0.02) == pytest.approx(-0.125)  # below chance: negative
    assert kept_above_chance(0.70, 0.65, 0.25, 0.02) == pytest.approx(1.125)  # better than the teacher
    # The teacher within two standard errors of chance (or below it): no meaningful share.
    assert kept_above_chance(0.19, 0.22, 0.25, 0.0185) is None
    assert kept_above_chance(0.30, 0.28, 0.25, 0.016) is None  # 0.03 above chance, 2 x 0.016 = 0.032
    assert kept_above_chance(0.30, 0.29, 0.25, 0.016) == pytest.approx(0.05 / 0.04)  # 0.04 > 0.032
    assert kept_above_chance(0.5, 0.9, 0.5, float("nan")) is None  # no standard error: cannot tell
    assert kept_above_chance(float("nan"), 0.9, 0.5, 0.01) is None


def test_kept_shares_and_json(tmp_path: Path) -> None:
    result = {
        "held_out": {
            "student": {"ppl": 20.0, "kl": 0.7, "top1": 0.55, "rouge_l": 0.2},
            "teacher": {"ppl": 10.0, "rouge_l": 0.25},
        },
        "benchmarks": {
            "tasks": {
                "arc_easy": {
                    "student": {"acc": 0.5, "acc_norm": 0.45, "n": 500},
                    "teacher": {"acc": 0.6, "acc_stderr": 0.02, "acc_norm": 0.5, "acc_norm_stderr": 0.02},
                },
                "boolq": {"student": {"acc": 0.6, "n": 500}, "teacher": {"acc": 0.6, "acc_stderr": 0.01}},
                # Both at or below chance (25 %): the plain ratio would say 86 % kept.
                "openbook_qa": {
                    "student": {"acc": 0.19, "n": 500},
                    "teacher": {"acc": 0.22, "acc_stderr": 0.019},
                },
            }
        },
    }
    shares = kept_shares(result)
    assert {k: v for k, v in shares.items() if v is not None} == pytest.approx(
        {
            "ppl": 0.5,
            "top1": 0.55,
            "rouge_l": 0.8,
            "arc_easy/acc": (0.5 - 0.25) / (0.6 - 0.25),
            "arc_easy/acc_norm": (0.45 - 0.25) / (0.5 - 0.25),
            "boolq/acc": 1.0,
        }
    )
    assert "openbook_qa/acc" in shares and shares["openbook_qa/acc"] is None  # not meaningful
    assert mean_kept(shares) == pytest.approx((0.8 + 1.0) / 2)  # acc_norm where a task has it; n/m left out
    _, rows = eval_table({"kept": shares, "benchmarks": result["benchmarks"]})
    assert [row[-1] for row in rows] == ["71.4%", "80.0%", "100.0%", "n/m", "90.0%"]
    write_json({"a": float("nan"), "b": [1.0, float("inf")]}, tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text()) == {"a": None, "b": [1.0, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]
