"""On-policy steps: the student writes the responses of a window, which is then trained like any other.

Whether a step is on-policy, and what the student samples, are drawn from generators seeded by
(seed, step) (and the process for the samples): a run resumed after a kill draws the same coin and the
same responses, and the global random state that training uses is never touched.

A generated batch is re-collated into the ordinary layout (right padding; the prompt's labels -100,
the generated tokens as labels, up to and including the first EOS), so the rest of the step is the
same as for data rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from kdistill.data import IGNORE_INDEX, Collator, Tokenized
from kdistill.sampling.decode import decode

Rows = list[list[list[int]]]  # per batch, per row: token ids


@dataclass(frozen=True)
class Sampling:
    """How the student writes its responses; plain values from `training.on_policy`."""

    lmbda: float
    max_new_tokens: int
    temperature: float
    top_p: float
    max_prompt_length: int
    eos_token_id: int
    pad_token_id: int
    generation_batch_size: int  # rows per generate call at the configured micro-batch (engine hf)
    loop: str = "static"  # the in-process decoding loop: static (`decode.decode`) or generate


def is_on_policy(lmbda: float, seed: int, step: int) -> bool:
    """The step's coin: True with probability `lmbda`, the same on every process and on resume."""
    if lmbda <= 0:
        return False
    if lmbda >= 1:
        return True
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return bool(torch.rand((), generator=generator) < lmbda)


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row` of a batch sampled with `seed` (within int64); every engine uses it."""
    return (seed * 1_000_003 + row) % 2**63


def rows_per_call(generation_batch_size: int, batch_size: int, micro: int) -> int:
    """Rows per generate call while the micro-batch is `micro` rows: `generation_batch_size` scaled
    down with the micro-batch (micro_batch_size, or the out-of-memory back-off), at least one."""
    return max(1, generation_batch_size * micro // batch_size)


def prompts(batch: dict[str, torch.Tensor], keep: int) -> list[list[int]]:
    """Each row's prompt tokens (those before its first label), the last `keep` of them (at least one)."""
    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        trained = (labels != IGNORE_INDEX).nonzero()
        end = int(trained[0]) if len(trained) else int(mask.sum())
        rows.append(ids[: max(end, 1)][-keep:].tolist())
    return rows


def left_padded(rows: list[list[int]], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def responses(out: torch.Tensor, eos: int) -> list[list[int]]:
    """The generated ids `(B, new)` of each row, cut after its first EOS (padding after it dropped)."""
    cut = []
    for row in out.tolist():
        cut.append(row[: row.index(eos) + 1] if eos in row else row)
    return cut


class RowSeeded(LogitsProcessor):
    """Samples every row from its own random stream: the Gumbel-max trick, argmax(log p - log E) with
    E ~ Exp(1) drawn from the row's generator, is a draw from p (after temperature and top-p). The
    chosen token gets score 0 and every other -inf, so greedy decoding takes it.

    A row's sample thus depends on its seed alone, not on which rows share its generate call: the
    window can be sampled in any grouping (and across processes) with the same result.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device) -> None:
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1 else None

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Each row's token `(B,)` for next-token scores `(B, vocab)`, one draw from each row's stream."""
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(None, scores)
        noise = torch.stack([torch.empty_like(scores[0]).exponential_(generator=g) for g in self.generators])
        return (scores.log_softmax(-1) - noise.log()).argmax(-1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = self.choose(scores)[:, None]
        return torch.full_like(scores, float("-inf"), dtype=torch.float32).scatter_(-1, chosen, 0.0)


@torch.inference_mode()
def sample(student: Any, rows: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[int]]:
    """The student's sampled responses to `rows` (prompt ids), row i from `seeds[i]` alone (`RowSeeded`):
    all rows in one call, left padded, in eval mode (no dropout), LoRA adapters active; by the loop
    `sampling.loop` names (`static`: `decode.decode`; `generate`: transformers' generate)."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    draw = RowSeeded(seeds, sampling.temperature, sampling.top_p, device)
    inputs = left_padded(rows, sampling.pad_token_id, device)
    try:
        if sampling.loop == "generate":
            out = _generated(student, inputs, sampling, draw)
        else:
            out = decode(
                student, inputs, draw.choose, max_new_tokens=sampling.max_new_tokens,
                eos=sampling.eos_token_id, pad=sampling.pad_token_id,
            )  # fmt: skip
    finally:
        student.train(was_training)
    return responses(out, sampling.eos_token_id)


def _generated(
    student: Any, inputs: dict[str, torch.Tensor], sampling: Sampling, draw: RowSeeded
) -> torch.Tensor:
    """transformers' generate with `draw` as its only logits processor: the generated ids `(B, new)`."""
    settings = GenerationConfig(
        do_sample=False,  # RowSeeded has already drawn each row's token
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=sampling.eos_token_id,
        pad_token_id=sampling.pad_token_id,
        use_cache=True,  # training turns it off in the model's config
    )
    out = student.generate(**inputs, generation_config=settings, logits_processor=LogitsProcessorList([draw]))
    return out[:, inputs["input_ids"].shape[1] :]


def sample_grouped(
    student: Any, rows: list[list[int]], sampling: Sampling, seeds: list[int], group: int
) -> list[list[int]]:
    """`sample` over `rows` in calls of at most `group` rows, rows of like prompt length together (less
    left padding); the answers come back in the order of `rows`."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)
    out: list[list[int]] = [[] for _ in rows]
    for start in range(0, len(order), group):
        part = order[start : start + group]
        for i, answer in zip(
            part, sample(student, [rows[i] for i in part], sampling, [seeds[i] for i in part])
        ):
            out[i] = answer
    return out


def requests(
    window: list[dict[str, torch.Tensor]], sampling: Sampling, seed: int, process: tuple[int, int] = (0, 1)
) -> tuple[list[list[list[int]]], list[int]]:
    """What `window`'s batches ask the student to write: each batch's prompts, and each batch's seed,
    by its place in the step's global window (`i * count + index`, `process` = `(index, count)`)."""
    index, processes = process
    rows = [prompts(batch, sampling.max_prompt_length) for batch in window]
    return rows, [seed * 1009 + i * processes + index for i in range(len(window))]


def step_seed(seed: int, step: int) -> int:
    """The seed of optimizer step `step`'s samples in a run seeded with `seed`."""
    return seed * 100_003 + step


def written_window(
    window: list[dict[str, torch.Tensor]],
    sampling: Sampling,
    collator: Collator,
    seed: int,
    process: tuple[int, int],
    write: Callable[[Rows, list[int]], Rows],
) -> tuple[list[dict[str, torch.Tensor]], dict[str, float]]:
    """`window` with every batch's responses written by `write` (each batch's prompts and seed ->
    each batch's responses), and the generation's sums (`gen_tokens`, `gen_rows`, `gen_seconds`).
    `seed` differs per step; `process` is `(index, count)`.

    Each batch has its own seed (`requests`), and its row r samples from `row_seed(seed, r)`: N
    processes of one micro-batch each sample what one process accumulating N writes.
    """
    started = time.perf_counter()
    rows, seeds = requests(window, sampling, seed, process)
    written = write(rows, seeds)
    batches, tokens, count = [], 0, 0
    for batch, prompt_rows, answers in zip(window, rows, written):
        items = [Tokenized(p + r, [IGNORE_INDEX] * len(p) + r) for p, r in zip(prompt_rows, answers)]
        device = batch["input_ids"].device
        batches.append({k: v.to(device) for k, v in collator.pad(items, collator.pad_token_id).items()})
        tokens += sum(len(r) for r in answers)
        count += len(answers)
    seconds = time.perf_counter() - started
    return batches, {"gen_tokens": tokens, "gen_rows": count, "gen_seconds": seconds}


def write_in_process(student: Any, rows: Rows, seeds: list[int], sampling: Sampling, group: int) -> Rows:
    """Each batch's responses, sampled by `student` in this process, `group` rows per generate call
    (`sample_grouped`); row r of a batch with seed s samples from `row_seed(s, r)`."""
    flat = [row for batch in rows for row in batch]
    row_seeds = [row_seed(s, r) for batch, s in zip(rows, seeds) for r in range(len(batch))]
    answers = iter(sample_grouped(student, flat, sampling, row_seeds, group))
    return [[next(answers) for _ in batch] for batch in rows]


def generated_window(
    student: Any,
    window: list[dict[str, torch.Tensor]],
    sampling: Sampling,
    collator: Collator,
    seed: int,
    process: tuple[int, int] = (0, 1),
    group: int | None = None,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, float]]:
    """`written_window` with the student sampling in this process, `group` rows (default: all) per
    generate call."""

    def write(rows: Rows, seeds: list[int]) -> Rows:
        return write_in_process(student, rows, seeds, sampling, group or sum(map(len, rows)))

    return written_window(window, sampling, collator, seed, process, write)
