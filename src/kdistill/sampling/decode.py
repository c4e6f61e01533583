"""The in-process sampler's decoding loop: a preallocated (static) KV cache, every row of the call in
one forward per token, and no per-token Python work beyond drawing the tokens.

It writes the same tokens as transformers' `generate` with `RowSeeded` (greedy over the row-seeded
draw): the prompt is left padded, positions count the real tokens only, each row draws from its own
generator once per step until every row has ended, and tokens after a row's EOS are padding. What it
saves is generate's per-token bookkeeping (stopping criteria, logits processors, growing masks and
caches): the step passes a ready 4-D mask, so the model builds none, and the cache is written in place.

The cache holds exactly prompt + `max_new_tokens` positions: a longer one makes every step attend over
more (masked) keys. `torch.compile` of the one-token step does not pay on CPU: at 8 rows a call the
step is bound by reading the weights (the matmuls are 70 % of it, the row-seeded draws 11 %), and
its compile costs a minute (docs/on-policy.md, "The in-process sampler").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import StaticCache


def _forward(
    student: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
) -> torch.Tensor:
    """The student's next-token logits (float32, `(B, vocab)`) for `ids` at `positions`."""
    out = student(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float()


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's real tokens (left padding: padding counts as position 1,
    as in generate; it is masked)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.inference_mode()
def decode(
    student: Any,
    inputs: dict[str, torch.Tensor],
    draw: Callable[[torch.Tensor], torch.Tensor],
    *,
    max_new_tokens: int,
    eos: int,
    pad: int,
) -> torch.Tensor:
    """The generated ids `(B, new)` after the left-padded prompts `inputs` (`input_ids`,
    `attention_mask`): `draw(logits)` picks each step's tokens `(B,)`; a row that has written `eos`
    gets `pad` after it; the loop ends when every row has ended or after `max_new_tokens`."""
    ids, prompt_mask = inputs["input_ids"], inputs["attention_mask"]
    rows, width = ids.shape
    length = width + max_new_tokens
    cache = StaticCache(config=student.config, max_cache_len=length)
    mask = torch.zeros((rows, length), dtype=torch.bool, device=ids.device)
    mask[:, :width] = prompt_mask.bool()
    positions = positions_of(prompt_mask)
    logits = _forward(student, ids, prompt_mask, positions, cache)
    position = positions[:, -1:].clone()
    out = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=ids.device)
    ended = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    for t in range(max_new_tokens):
        token = draw(logits).masked_fill(ended, pad)
        out[:, t] = token
        ended |= token == eos
        if t + 1 == max_new_tokens or bool(ended.all()):
            return out[:, : t + 1]
        mask[:, width + t] = True
        position += 1
        # (B, 1, 1, length): the row's real tokens up to this one (nothing later is set yet)
        logits = _forward(student, token[:, None], mask[:, None, None, :], position, cache)
    return out
