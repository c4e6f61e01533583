"""The static-cache decoding loop writes what transformers' generate writes: the same greedy tokens,
and the same row-seeded samples, reproducibly from the seeds."""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from kdistill.sampling.decode import decode, positions_of
from kdistill.sampling.generate import Sampling, left_padded, row_seed, sample

TEXTS = ["The capital of", "Write a short poem about the sea and", "Why", "List three"]


def _student_and_rows(tiny: dict) -> tuple[torch.nn.Module, list[list[int]], Sampling]:
    student = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    rows = [tokenizer(t)["input_ids"] for t in TEXTS]
    sampling = Sampling(1.0, 12, 1.0, 1.0, 48, tokenizer.eos_token_id, tokenizer.pad_token_id, 4)
    return student, rows, sampling


def test_positions_count_real_tokens_only() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_of(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_greedy_tokens_match_generate(tiny: dict) -> None:
    student, rows, s = _student_and_rows(tiny)
    inputs = left_padded(rows, s.pad_token_id, torch.device("cpu"))
    settings = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=s.eos_token_id,
                                pad_token_id=s.pad_token_id, use_cache=True)  # fmt: skip
    expected = student.generate(**inputs, generation_config=settings)[:, inputs["input_ids"].shape[1] :]
    ours = decode(student, inputs, lambda logits: logits.argmax(-1), max_new_tokens=12,
                  eos=s.eos_token_id, pad=s.pad_token_id)  # fmt: skip
    assert ours.shape == (4, 12)
    assert ours.tolist() == expected.tolist()


def test_row_seeded_samples_match_generate_and_repeat(tiny: dict) -> None:
    student, rows, s = _student_and_rows(tiny)
    seeds = [row_seed(11, r) for r in range(len(rows))]
    static = sample(student, rows, s, seeds)
    assert static == sample(student, rows, replace(s, loop="generate"), seeds)
    assert static == sample(student, rows, s, seeds)  # the same seeds, the same tokens
    assert static != sample(student, rows, s, [x + 1 for x in seeds])
    assert sum(map(len, static)) > len(rows)


def test_a_row_ending_at_eos_is_cut_there(tiny: dict) -> None:
    """A draw that writes EOS at the third token: every row stops there, and the loop stops with them."""
    student, rows, s = _student_and_rows(tiny)
    inputs = left_padded(rows, s.pad_token_id, torch.device("cpu"))
    calls = []

    def draw(logits: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        token = s.eos_token_id if len(calls) == 3 else 5
        return torch.full((logits.shape[0],), token, dtype=torch.long)

    out = decode(student, inputs, draw, max_new_tokens=12, eos=s.eos_token_id, pad=s.pad_token_id)
    assert out.tolist() == [[5, 5, s.eos_token_id]] * 4
    assert len(calls) == 3
