"""The in-process sampler of on-policy steps: each row draws from its own seed (Gumbel-max), from the
right distribution, whatever rows share its generate call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdistill.config import load_config
from kdistill.prerun.memory_plan import memory_plan
from kdistill.sampling.generate import RowSeeded, Sampling, row_seed, rows_per_call, sample, sample_grouped

SCORES = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def _draws(temperature: float, top_p: float, rows: int = 6000) -> torch.Tensor:
    draw = RowSeeded([row_seed(7, r) for r in range(rows)], temperature, top_p, torch.device("cpu"))
    out = draw(torch.zeros(rows, 1, dtype=torch.long), SCORES.expand(rows, -1).clone())
    assert torch.all(torch.isinf(out).sum(-1) == len(SCORES) - 1)  # one token kept per row, at score 0
    return out.argmax(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rows_are_drawn_from_the_tempered_softmax(temperature: float) -> None:
    counts = torch.bincount(_draws(temperature, 1.0), minlength=len(SCORES)).double()
    expected = torch.softmax(SCORES.double() / temperature, -1)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.02)


def test_top_p_keeps_only_the_nucleus_renormalised() -> None:
    # softmax(SCORES) = .56 .21 .13 .08 .03 .004: top_p 0.8 keeps the first three tokens
    chosen = _draws(1.0, 0.8)
    assert set(chosen.tolist()) == {0, 1, 2}
    counts = torch.bincount(chosen, minlength=3).double()
    expected = torch.softmax(SCORES[:3].double(), -1)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.02)


def test_a_row_samples_the_same_with_any_companions(tiny: dict) -> None:
    """Sampled alone, in one call with the others, or grouped by two: the same tokens per row."""
    student = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float32).train()
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    texts = ["The capital of", "Write a short poem about the sea and", "Why", "List three"]
    rows = [tokenizer(t)["input_ids"] for t in texts]
    sampling = Sampling(1.0, 10, 1.0, 1.0, 48, tokenizer.eos_token_id, tokenizer.pad_token_id, 4)
    seeds = [row_seed(3, r) for r in range(len(rows))]
    together = sample(student, rows, sampling, seeds)
    alone = [sample(student, [row], sampling, [seed])[0] for row, seed in zip(rows, seeds)]
    assert together == alone == sample_grouped(student, rows, sampling, seeds, 2)
    assert all(len(r) > 0 for r in together)
    assert sample(student, rows, sampling, [s + 1 for s in seeds]) != together  # other seeds, other text
    assert student.training  # sample restores the mode it found


def test_generate_calls_scale_with_the_micro_batch() -> None:
    assert rows_per_call(16, 4, 4) == 16  # the window of 4 x 4 in one call
    assert rows_per_call(16, 4, 2) == 8  # back-off halved the micro-batch: half as many rows a call
    assert rows_per_call(2, 4, 1) == 1


def test_the_memory_plan_samples_the_whole_window(tmp_path: Path, tiny: dict) -> None:
    from conftest import tiny_config, write_config

    on = {"lmbda": 1.0, "max_new_tokens": 12, "max_prompt_length": 48}
    training = {"batch_size": 4, "gradient_accumulation_steps": 3, "on_policy": on}
    cfg = load_config(write_config(tmp_path / "a.yaml", tiny_config(tiny, tmp_path / "a", training=training)))
    assert memory_plan(cfg, None).gen_rows == 12
    engine = {"kind": "hf", "generation_batch_size": 6}
    training = {**training, "micro_batch_size": 2, "on_policy": {**on, "engine": engine}}
    cfg = load_config(write_config(tmp_path / "b.yaml", tiny_config(tiny, tmp_path / "b", training=training)))
    assert memory_plan(cfg, None).gen_rows == 3
