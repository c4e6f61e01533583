"""Where a pruned student starts: its response perplexity and KL to the teacher on held-out rows.

The same measure as training's held-out quality (`objective.quality`: per response token, T = 1), in
plain logits: a made student and its teacher share one tokenizer, and this runs before any training
wrapper exists.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from kdistill.models.parts import softcap

_MAX_CE = 50.0  # as objective.quality: exp(ce) is not reported above e^50


@torch.no_grad()
def response_quality(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    progress: bool = True,
    memo: dict[int, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Per response token: KL(teacher || student), the student's and the teacher's cross-entropy and
    perplexity, and top-1 agreement. Batches carry `input_ids`, `attention_mask` and `labels` `(B, T)`.
    `memo` keeps the teacher's log-probs per batch index between calls on the same batches."""
    sums = dict.fromkeys(("kl", "ce", "teacher_ce", "agree"), 0.0)
    tokens = 0
    memo = {} if memo is None else memo
    for i, batch in enumerate(
        tqdm(list(batches), desc="held-out quality", unit="batch", disable=not progress)
    ):
        mask = batch["labels"][:, 1:] != -100
        targets = batch["labels"][:, 1:][mask]
        if i not in memo:
            memo[i] = response_log_probs(teacher, batch, mask)
        t, s = memo[i], response_log_probs(student, batch, mask)
        sums["kl"] += float((t.exp() * (t - s)).sum())
        sums["ce"] -= float(s.gather(-1, targets[:, None]).sum())
        sums["teacher_ce"] -= float(t.gather(-1, targets[:, None]).sum())
        sums["agree"] += float((t.argmax(-1) == s.argmax(-1)).sum())
        tokens += int(mask.sum())
    n = max(tokens, 1)
    out = {key: value / n for key, value in sums.items()}
    out["ppl"] = math.exp(min(out["ce"], _MAX_CE))
    out["teacher_ppl"] = math.exp(min(out["teacher_ce"], _MAX_CE))
    out["tokens"] = float(tokens)
    return out


def response_log_probs(
    model: nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Log-probs `(N, V)` of the next token at the `N` positions of `mask` `(B, T-1)`, in `dtype`; the
    head runs only there."""
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, :-1][mask]).to(dtype)
    cap = softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 32) -> float:
    """Greedy decode tokens per second of `model` for `prompt` `(B, T)` (KV cache on)."""
    was = model.config.use_cache
    model.config.use_cache = True
    model.generate(prompt, max_new_tokens=2, do_sample=False, min_new_tokens=2)  # warm-up
    started = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - started
    model.config.use_cache = was
    return (out.shape[1] - prompt.shape[1]) * out.shape[0] / seconds
