"""`kdistill fidelity`: how far a quantized teacher's next-token distributions are from its reference.

On every held-out response token, with `p` the reference's distribution and `q` the compared model's:

- `kl`: KL(p || q) per token, in nats: what a student taught by `q` is pulled away from `p`;
- `top1`: the share of tokens where both put the same token first;
- `topk_overlap`: |top-k(p) ∩ top-k(q)| / k, averaged over tokens;
- `ppl` and `ppl_reference`: the perplexity of each on the reference responses.

The reference runs once and keeps only its final hidden states at the response tokens (`N x H`); each
compared model then runs in turn. Logits are made a chunk of rows at a time from hidden states and
each model's output head, so the `(N, V)` logits never exist (Gemma-3's vocabulary is 262,144).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdistill.data import Collator, Example, tokenize_examples, trained_rows
from kdistill.losses import DEFAULT_CHUNK_SIZE, DenseHidden
from kdistill.losses.divergences import forward_kl
from kdistill.models.parts import output_head, softcap
from kdistill.objective.quality import perplexity
from kdistill.teacher.live import teacher_hidden

log = logging.getLogger("kdistill")


@dataclass(frozen=True)
class FidelitySettings:
    """Plain values from the command line."""

    rows: int | None = 64  # held-out rows; None = all
    top_k: int = 10
    batch_size: int = 8
    max_length: int = 512
    chunk_size: int = DEFAULT_CHUNK_SIZE


@dataclass(frozen=True)
class States:
    """One model's signal on the held-out batches: per batch its `DenseHidden` at the response tokens."""

    batches: list[DenseHidden]
    targets: list[Tensor]  # per batch, `(N,)` the next tokens of the responses


def held_out_batches(
    examples: list[Example], tokenizer: Any, settings: FidelitySettings
) -> list[dict[str, Tensor]]:
    """The first `settings.rows` examples tokenized like training rows, in batches sorted by length."""
    rows, dropped = tokenize_examples(examples[: settings.rows], tokenizer, settings.max_length)
    log.info("fidelity: %d held-out rows (%d without a response token dropped)", len(rows), dropped)
    rows.sort(key=lambda row: len(row.input_ids))
    collate = Collator(tokenizer.pad_token_id)
    step = settings.batch_size
    return [collate(rows[i : i + step]) for i in range(0, len(rows), step)]


def model_states(model: nn.Module, batches: list[dict[str, Tensor]], name: str) -> States:
    """`model`'s final hidden states at the response tokens of every batch, with its output head."""
    head, bias = output_head(model)
    cap = softcap(model)
    signals, targets = [], []
    for batch in tqdm(batches, desc=f"fidelity: {name}", unit="batch"):
        mask, next_tokens = trained_rows(batch["labels"])
        hidden, _ = teacher_hidden(model, batch, mask)
        signals.append(DenseHidden(hidden, head, bias, cap))
        targets.append(next_tokens.to(hidden.device))
    return States(signals, targets)


@torch.no_grad()
def compare(
    reference: States, other: States, top_k: int = 10, chunk_size: int | None = DEFAULT_CHUNK_SIZE
) -> dict[str, float]:
    """KL(reference || other), top-1 agreement, top-k overlap and both perplexities, per token.

    Both `States` must come from the same batches. `chunk_size` rows of logits are held at a time.
    """
    sums = {"kl": 0.0, "top1": 0.0, "topk_overlap": 0.0, "ce_reference": 0.0, "ce": 0.0}
    tokens = 0
    for ref, oth, targets in zip(reference.batches, other.batches, reference.targets):
        rows = targets.shape[0]
        step = chunk_size or max(rows, 1)
        for start in range(0, rows, step):
            end = min(start + step, rows)
            p_logits, q_logits = ref.rows(start, end), oth.rows(start, end).to(ref.hidden.device)
            sums["kl"] += float(forward_kl(q_logits, p_logits))  # KL(p_teacher || p_student) = KL(p || q)
            sums["top1"] += int((p_logits.argmax(-1) == q_logits.argmax(-1)).sum())
            k = min(top_k, p_logits.shape[-1])
            p_top, q_top = p_logits.topk(k, dim=-1).indices, q_logits.topk(k, dim=-1).indices
            sums["topk_overlap"] += int((p_top[:, :, None] == q_top[:, None, :]).any(-1).sum()) / k
            chunk_targets = targets[start:end, None]
            sums["ce_reference"] -= float(p_logits.log_softmax(-1).gather(-1, chunk_targets).sum())
            sums["ce"] -= float(q_logits.log_softmax(-1).gather(-1, chunk_targets).sum())
        tokens += rows
    if tokens == 0:
        return {}
    mean = {key: value / tokens for key, value in sums.items()}
    return {
        "kl": mean["kl"],
        "top1": mean["top1"],
        "topk_overlap": mean["topk_overlap"],
        "ppl_reference": perplexity(mean["ce_reference"]),
        "ppl": perplexity(mean["ce"]),
        "tokens": float(tokens),
    }


@dataclass
class Compared:
    """A model to compare with the reference: its label, what it is, and how to load it."""

    label: str
    description: str
    load: Any  # () -> model


def teacher_fidelity(
    reference: Compared,
    others: list[Compared],
    examples: list[Example],
    tokenizer: Any,
    settings: FidelitySettings,
) -> dict[str, Any]:
    """Run the reference, then each other model in turn, and compare them on `examples`.

    Each model is loaded just before its pass and dropped after it, so at most one model and the
    reference's hidden states and head are held at a time. The result is JSON-able:
    `{"reference": {label, description}, "rows", "tokens", "top_k", "compared": [{label,
    description, kl, top1, topk_overlap, ppl, ppl_reference, seconds}], "seconds"}`.
    """
    started = time.perf_counter()
    batches = held_out_batches(examples, tokenizer, settings)
    ref_states = _states(reference, batches)
    # The reference against itself: KL 0, agreement 1, and the reference's own perplexity.
    rows = [{"label": reference.label, "description": reference.description, "seconds": ref_states[1]}]
    rows[0] |= compare(ref_states[0], ref_states[0], settings.top_k, settings.chunk_size)
    for other in others:
        states, seconds = _states(other, batches)
        measured = compare(ref_states[0], states, settings.top_k, settings.chunk_size)
        rows.append({"label": other.label, "description": other.description, "seconds": seconds} | measured)
        del states
    return {
        "reference": {"label": reference.label, "description": reference.description},
        "rows": sum(int(b["input_ids"].shape[0]) for b in batches),
        "tokens": rows[0].get("tokens", 0.0),
        "top_k": settings.top_k,
        "compared": rows,
        "seconds": time.perf_counter() - started,
    }


def _states(model: Compared, batches: list[dict[str, Tensor]]) -> tuple[States, float]:
    started = time.perf_counter()
    loaded = model.load()
    states = model_states(loaded, batches, model.label)
    del loaded  # the head stays referenced by the states; the rest of the model goes
    return states, time.perf_counter() - started


def fidelity_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """model | what it is | KL | top-1 | top-k overlap | perplexity, one row per compared model."""
    k = result["top_k"]
    headers = ["model", "what it is", "KL(ref || model)", "top-1 agreement", f"top-{k} overlap", "perplexity"]
    body = [
        [
            row["label"],
            row["description"],
            f"{row['kl']:.4f}",
            f"{row['top1']:.1%}",
            f"{row['topk_overlap']:.1%}",
            f"{row['ppl']:.2f}",
        ]
        for row in result["compared"]
        if "kl" in row
    ]
    return headers, body
