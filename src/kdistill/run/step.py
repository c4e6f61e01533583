"""One optimizer step: forward and backward over an accumulation window, then the update.

Gradient accumulation is done by hand rather than with `accelerator.accumulate`, because the loss
is normalised by the number of trained tokens in the whole accumulation window (across
processes), not per micro-batch: a window's micro-batches may hold very different numbers of
response tokens, and averaging per micro-batch would weight short responses more.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from accelerate import Accelerator

from kdistill.data import trained_rows
from kdistill.losses import LossSums
from kdistill.objective.batch import LossSettings, StepSums
from kdistill.prerun.flops import attention_pairs
from kdistill.run.accelerator import single_process
from kdistill.teacher.forward import teacher_outputs
from kdistill.teacher.roster import Teacher


def optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    teachers: list[Teacher],
    window: list[dict[str, torch.Tensor]],
    settings: LossSettings,
    optimizer: Any,
    max_grad_norm: float | None,
) -> dict[str, float]:
    """Forward and backward over one accumulation window, then one optimizer step; the window's sums.

    `model` is the prepared `StudentLoss`; its forward is the batch's loss (`objective.batch`).
    """
    local = sum(int(trained_rows(b["labels"])[1].numel()) for b in window)
    trained = accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum").item()
    # DDP averages gradients over processes, so scale by their number to get a sum over all tokens / trained.
    scale = accelerator.num_processes / max(trained, 1)
    # One process: the head's gradient goes straight into its .grad (no second (V, H) buffer beside it).
    direct = scale if single_process(accelerator) else None
    layers = accelerator.unwrap_model(model).teacher_layers() if settings.hidden_weight > 0 else None
    totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "trained": local, "tokens": 0, "pairs": 0}
    # The longest micro-batch first: its activations then peak before any gradient exists; later ones
    # hold the gradients beside smaller activations (the same sums, added in another order).
    window = sorted(window, key=lambda b: -b["input_ids"].numel())
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        # DeepSpeed steps its optimizer inside backward when this flag is set: only on the last one.
        accelerator.sync_gradients = last
        with sync, accelerator.autocast():
            outputs = None
            if teachers:
                vocab, mode, kd = settings.vocab_size, settings.multi_teacher, settings.alpha > 0
                outputs = teacher_outputs(teachers, batch, "train", vocab, mode, layers, kd)
            sums = model(batch, outputs, settings, head_grad_scale=direct)
            accelerator.backward(sums.total * scale)
        _add_sums(totals, sums, [t.name for t in teachers])
        totals["tokens"] += int(batch["attention_mask"].sum())
        totals["pairs"] += attention_pairs(batch["attention_mask"])  # for flops_per_s (run/flops.py)
    if max_grad_norm is not None:
        totals["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def _add_sums(totals: dict[str, float], sums: LossSums, names: list[str]) -> None:
    """Add one micro-batch's sums to the window's: the loss, its parts, and each teacher's own."""
    totals["loss"] += float(sums.total.detach())
    totals["kd"] += float(sums.kd)
    totals["ce"] += float(sums.ce)
    if sums.kd_parts is not None:
        for name, part in zip(names, sums.kd_parts.tolist()):
            totals[f"kd/{name}"] = totals.get(f"kd/{name}", 0.0) + part
    if isinstance(sums, StepSums):  # loss.hidden: the teacher-weighted sum, and each teacher's own
        totals["hidden"] = totals.get("hidden", 0.0) + float(sums.hidden)
        each = sums.hidden_parts.tolist() if len(names) > 1 else []
        for name, part in zip(names, each):
            totals[f"hidden/{name}"] = totals.get(f"hidden/{name}", 0.0) + part
