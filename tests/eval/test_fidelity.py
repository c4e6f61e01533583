"""`kdistill fidelity`: a teacher against its quantized self, checked against plain full-logit maths."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SHARED_DATA, tiny_config, write_config
from kdistill.cli import main
from kdistill.data import load_examples, trained_rows
from kdistill.eval.fidelity import FidelitySettings, compare, held_out_batches, model_states

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _setup(tiny: dict[str, Path]) -> tuple[list[dict], torch.nn.Module, torch.nn.Module]:
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    examples = load_examples(str(tiny["data"]), "train")[0]
    batches = held_out_batches(examples, tokenizer, FidelitySettings(rows=12, batch_size=5, max_length=48))
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    # The teacher with noise on every weight: near it, as a quantized copy is.
    noisy = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for param in noisy.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return batches, teacher, noisy


def _naive(batches: list[dict], reference: torch.nn.Module, other: torch.nn.Module, k: int) -> dict:
    """The same metrics from full `(B, T, V)` logits, token by token."""
    kl, top1, overlap, ce_p, ce_q, n = 0.0, 0, 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for batch in batches:
            mask, targets = trained_rows(batch["labels"])
            args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            p = reference(**args).logits[:, :-1][mask].log_softmax(-1)
            q = other(**args).logits[:, :-1][mask].log_softmax(-1)
            for i, target in enumerate(targets.tolist()):
                kl += float((p[i].exp() * (p[i] - q[i])).sum())
                top1 += int(p[i].argmax() == q[i].argmax())
                overlap += len(set(p[i].topk(k).indices.tolist()) & set(q[i].topk(k).indices.tolist())) / k
                ce_p, ce_q, n = ce_p - float(p[i, target]), ce_q - float(q[i, target]), n + 1
    return {"kl": kl / n, "top1": top1 / n, "topk_overlap": overlap / n, "ppl_reference": math.exp(ce_p / n),
            "ppl": math.exp(ce_q / n), "tokens": float(n)}  # fmt: skip


def test_a_model_against_itself(tiny: dict[str, Path]) -> None:
    batches, teacher, _ = _setup(tiny)
    states = model_states(teacher, batches, "teacher")
    result = compare(states, states, top_k=10, chunk_size=7)
    assert result["kl"] == 0.0 and result["top1"] == 1.0 and result["topk_overlap"] == 1.0
    assert result["ppl"] == result["ppl_reference"] > 1


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_metrics_match_full_logits(tiny: dict[str, Path], chunk_size: int | None) -> None:
    batches, teacher, student = _setup(tiny)
    expected = _naive(batches, teacher, student, k=10)
    got = compare(model_states(teacher, batches, "t"), model_states(student, batches, "s"), 10, chunk_size)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert 0 < got["top1"] < 1 and 0 < got["topk_overlap"] < 1 and got["kl"] > 0


def test_fidelity_command_on_a_model(tiny: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "fidelity.json"
    argv = ["fidelity", str(tiny["teacher"]), "--against", str(tiny["student"]), "--validation"]
    argv += [str(tiny["data"]), "--rows", "8", "--top-k", "5", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["compared"]
    assert [r["label"] for r in rows] == [str(tiny["teacher"]), str(tiny["student"])]
    assert rows[0]["kl"] == 0 and rows[1]["kl"] > 0 and result["rows"] == 8 and result["top_k"] == 5
    assert rows[0]["description"] == "float32 weights"
    assert "top-5 overlap" in capsys.readouterr().out


@pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed (kdistill[quant])")
def test_fidelity_command_on_a_run_config(tiny: dict[str, Path], tmp_path: Path) -> None:
    # The run's first teacher in full precision is the reference, its held-out rows the data.
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "out"))
    out = tmp_path / "fidelity.json"
    argv = ["fidelity", str(config), "--against", "4bit", "--against", "8bit", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    labels = [row["label"] for row in result["compared"]]
    assert labels == [str(tiny["teacher"]), "NF4", "LLM.int8"] and result["rows"] == 8
    nf4, int8 = result["compared"][1:]
    assert 0 < int8["kl"] < nf4["kl"] and nf4["top1"] < 1.0  # 8 bits are closer than 4


def test_fidelity_without_rows(tiny: dict[str, Path], capsys) -> None:
    assert main(["fidelity", str(tiny["teacher"])]) == 2
    assert "no held-out rows to compare on; give --validation FILE" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED_DATA / "tokenizers").is_dir(), reason="../shared/data/tokenizers is absent")
def test_fidelity_against_another_tokenizer(tiny: dict[str, Path], tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    AutoModelForCausalLM.from_pretrained(tiny["teacher"]).save_pretrained(other)
    AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "gpt2").save_pretrained(other)
    argv = ["fidelity", str(tiny["teacher"]), "--against", str(other), "--validation", str(tiny["data"])]
    assert main(argv) == 2
    assert "its tokenizer differs from" in capsys.readouterr().err
