"""One optimizer step: the window's rows from the sampler, forward and backward over its
micro-batches, then the update.

Gradient accumulation is done by hand rather than with `accelerator.accumulate`, because the loss
is normalised by the number of trained tokens in the whole accumulation window (across
processes), not per micro-batch: a window's micro-batches may hold very different numbers of
response tokens, and averaging per micro-batch would weight short responses more.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any

import torch
from accelerate import Accelerator

from kdistill.data import trained_rows
from kdistill.losses import LossSums
from kdistill.objective.batch import LossSettings, StepSums
from kdistill.prerun.flops import attention_pairs
from kdistill.run.accelerator import single_process
from kdistill.sampling.base import Sampler
from kdistill.teacher.forward import teacher_outputs
from kdistill.teacher.roster import Teacher


@dataclass
class Step:
    """One optimizer step, as the out-of-memory back-off calls it: `step(window, n, upcoming)`.

    `model` is the prepared `StudentLoss`, whose forward is the batch's loss (`objective.batch`);
    `optimizer` the NaN guard around the optimizer (`guards.SkipNonFinite`). With `sampled_mode`
    (`training.on_policy.mode: sampled`) a sampled window trains on the policy-gradient estimate.
    """

    accelerator: Accelerator
    model: torch.nn.Module
    teachers: list[Teacher]
    settings: LossSettings
    sampler: Sampler
    optimizer: Any
    max_grad_norm: float | None = None
    sampled_mode: bool = False

    def __call__(
        self, window: list[dict[str, torch.Tensor]], step: int, upcoming: list | None = None
    ) -> dict[str, float]:
        """Optimizer step `step` on `window` (cut into micro-batches by the back-off); its sums.

        The sampler gives the rows (on an on-policy step, the student's own responses) and starts on
        the next step's (`upcoming`); the teachers grade them; forward and backward run over the
        micro-batches, then the optimizer steps. All of it inside the back-off: a generation that runs
        out of memory is retried, with the step, on a finer cut.
        """
        rows = self.sampler.rows(window, step)
        stats = _added(rows.stats, self.sampler.send_ahead(upcoming, step + 1))
        teachers, settings = self._graders(rows.sampled)
        accelerator, model, window = self.accelerator, self.model, rows.window
        local = sum(int(trained_rows(b["labels"])[1].numel()) for b in window)
        trained = accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum").item()
        # DDP averages gradients over processes: scale by their number to get a sum over all tokens / trained.
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
            totals["pairs"] += attention_pairs(batch["attention_mask"])  # for flops_per_s (prerun/flops.py)
        if self.max_grad_norm is not None:
            totals["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), self.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**totals, **stats}

    def _graders(self, sampled: bool) -> tuple[list[Teacher], LossSettings]:
        """The teachers and loss settings of a window: on one the student wrote (`sampled`), only live
        teachers score it (a cache cannot), sharing the whole weight, and there is no CE term."""
        if not sampled:
            return self.teachers, self.settings
        live = [x for x in self.teachers if x.grades_samples]
        share = sum(x.weight for x in live)  # the live teachers share the whole weight
        teachers = [replace(x, weight=x.weight / share) for x in live]
        settings = replace(self.settings, ce=False)
        if self.sampled_mode:
            settings = replace(settings, divergence="sampled_reverse_kl", divergence_kwargs={})
        return teachers, settings


def _added(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """`a` with `b`'s values added to its own (the generation's sums of one step)."""
    return {**a, **{k: a.get(k, 0.0) + v for k, v in b.items()}}


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
