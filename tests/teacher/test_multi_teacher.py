"""Several teachers: the combined objectives, and a tiny student pulled toward the weighted mixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import _build_model, tiny_config, write_config
from kdistill.cli import main
from kdistill.data import Collator, trained_rows
from kdistill.losses import Dense, Ensemble, Sparse, distill_loss_sums
from kdistill.losses.divergences import forward_kl, reverse_kl
from kdistill.losses.ensemble import ensemble_divergence
from kdistill.losses.registry import LOSSES, divergence_choices
from kdistill.run.components import build_components


def _logits(n: int = 12, v: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, v, generator=g) * 2 for _ in range(3))


@pytest.mark.parametrize("name", divergence_choices())
def test_one_teacher_ensembles_equal_that_teacher(name: str) -> None:
    s, a, _ = _logits()
    fn, params = LOSSES[name].fn, {key: p.default for key, p in LOSSES[name].params.items()}
    single = fn(s, a, temperature=2.0, **params)
    for mode in ("sum", "mixture"):
        kd, parts = ensemble_divergence(s, Ensemble((a,), (1.0,), mode), fn, 2.0, **params)
        torch.testing.assert_close(kd, single)
        torch.testing.assert_close(parts, single[None])


def test_sum_and_mixture_against_references() -> None:
    s, a, b = _logits()
    s.requires_grad_(True)
    T, w = 2.0, (0.7, 0.3)
    pa, pb, q = (torch.log_softmax(x / T, -1) for x in (a, b, s))
    kd_sum, parts = ensemble_divergence(s, Ensemble((a, b), w, "sum"), forward_kl, T)
    ref_parts = torch.stack([(p.exp() * (p - q)).sum() for p in (pa, pb)])
    torch.testing.assert_close(parts, ref_parts.detach())
    torch.testing.assert_close(kd_sum, w[0] * ref_parts[0] + w[1] * ref_parts[1])
    mix = torch.log(w[0] * pa.exp() + w[1] * pb.exp())
    kd_mix, _ = ensemble_divergence(s, Ensemble((a, b), w, "mixture"), forward_kl, T)
    torch.testing.assert_close(kd_mix, (mix.exp() * (mix - q)).sum())
    assert kd_mix < kd_sum  # KL is convex in its first argument
    # Forward KL: the two objectives differ by a teacher-only constant, so their gradients agree.
    (g_sum,) = torch.autograd.grad(kd_sum, s)
    (g_mix,) = torch.autograd.grad(kd_mix, s)
    torch.testing.assert_close(g_sum, g_mix)
    reverse_sum, _ = ensemble_divergence(s, Ensemble((a, b), w, "sum"), reverse_kl, T)
    reverse_mix, _ = ensemble_divergence(s, Ensemble((a, b), w, "mixture"), reverse_kl, T)
    torch.testing.assert_close(reverse_mix, (q.exp() * (q - mix)).sum())
    assert not torch.isclose(reverse_sum, reverse_mix)


@pytest.mark.parametrize("mode", ["sum", "mixture"])
def test_chunked_ensemble_equals_unchunked(mode: str) -> None:
    torch.manual_seed(0)
    hidden, head = torch.randn(30, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (30,))
    a, b = torch.randn(30, 50) * 3, torch.randn(30, 50) * 3
    teachers = Ensemble((Dense(a), Sparse.from_logits(b, 8)), (0.6, 0.4), mode)
    results = []
    for chunk in (None, 7):
        sums = distill_loss_sums(
            hidden,
            head,
            labels,
            teachers,
            kd_weight=0.5 * 4,
            ce_weight=0.5,
            temperature=2.0,
            chunk_size=chunk,
        )
        grads = torch.autograd.grad(sums.total, (hidden, head))
        results.append((sums.total.detach(), sums.kd, sums.kd_parts, *grads))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def second_teacher(tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("teacher-b")
    AutoTokenizer.from_pretrained(tiny["teacher"]).save_pretrained(folder)
    vocab = len(AutoTokenizer.from_pretrained(tiny["teacher"]))
    _build_model(folder, vocab, layers=4, seed=7, init_range=0.2)
    return folder


def _mixture_kl(student: torch.nn.Module, teachers: list, weights: list, batch: dict) -> float:
    mask, _ = trained_rows(batch["labels"])
    with torch.no_grad():
        outs = [
            m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
            for m in [student, *teachers]
        ]
    mix = torch.logsumexp(
        torch.stack([torch.log_softmax(o, -1) + torch.tensor(w).log() for o, w in zip(outs[1:], weights)]),
        dim=0,
    )
    return float((mix.exp() * (mix - torch.log_softmax(outs[0], -1))).sum(-1).mean())


@pytest.mark.parametrize("mode", ["sum", "mixture"])
def test_student_moves_toward_the_weighted_mixture(
    tmp_path: Path, tiny: dict, second_teacher: Path, mode: str
) -> None:
    teachers = [
        {"model": str(tiny["teacher"]), "name": "a", "weight": 3.0},
        {"model": str(second_teacher), "name": "b", "weight": 1.0},
    ]
    config = tiny_config(
        tiny,
        tmp_path / "out",
        loss={"alpha": 1.0, "temperature": 1.0, "multi_teacher": mode},
        training={"num_epochs": 10, "learning_rate": 1e-2, "warmup_steps": 5},
    )
    del config["teacher"]
    config["teachers"] = teachers
    path = write_config(tmp_path / "run.yaml", config)
    from kdistill.config import load_config

    parts = build_components(load_config(path), torch.device("cpu"))
    assert [t.name for t in parts.teachers] == ["a", "b"] and [t.weight for t in parts.teachers] == [
        0.75,
        0.25,
    ]
    batch = Collator(parts.tokenizer.pad_token_id)(parts.data.train[:24])
    models = [t.model for t in parts.teachers]
    before = _mixture_kl(parts.student, models, [0.75, 0.25], batch)
    before_a = _mixture_kl(parts.student, models[:1], [1.0], batch)
    assert main(["train", str(path)]) == 0
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    after = _mixture_kl(student, models, [0.75, 0.25], batch)
    after_a, after_b = (_mixture_kl(student, [m], [1.0], batch) for m in models)
    assert after < 0.6 * before, (before, after)
    assert after_a < before_a
    # Closer to the 3:1 mixture than to either teacher alone, and closer to the heavier one.
    assert after < after_a < after_b, (after, after_a, after_b)
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in logged if "loss/kd/a" in r]
    assert train_rows and all("loss/kd/b" in r for r in train_rows)
    assert train_rows[-1]["loss/kd/a"] < train_rows[-1]["loss/kd/b"]


def test_live_and_cached_teachers_together(tmp_path: Path, tiny: dict, second_teacher: Path) -> None:
    config = tiny_config(tiny, tmp_path / "out", loss={"alpha": 1.0, "multi_teacher": "mixture"})
    del config["teacher"]
    config["teachers"] = [
        {"model": str(tiny["teacher"]), "name": "cached", "cache": str(tmp_path / "cache")},
        {"model": str(second_teacher), "name": "live"},
    ]
    path = write_config(tmp_path / "run.yaml", config)
    assert main(["cache", str(path)]) == 0
    assert main(["train", str(path)]) == 0
    logged = (tmp_path / "out" / "metrics.jsonl").read_text()
    assert "loss/kd/cached" in logged and "loss/kd/live" in logged


def test_a_mixture_with_a_teacher_of_another_tokenizer_is_refused(tmp_path: Path, tiny: dict, capsys) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "other"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a different tiny vocabulary"] * 5, trainers.BpeTrainer(vocab_size=60))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="a", pad_token="a").save_pretrained(other)
    _build_model(other, len(tok.get_vocab()), layers=2, seed=3)
    config = tiny_config(tiny, tmp_path / "out")
    config["teachers"] = [config.pop("teacher"), {"model": str(other), "name": "other"}]
    config["loss"]["multi_teacher"] = "mixture"  # one mixture needs one vocabulary; `sum` would align it
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 2
    err = capsys.readouterr().err
    assert "teacher 'other' uses another tokenizer" in err and "use loss.multi_teacher: sum" in err
