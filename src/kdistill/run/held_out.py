"""The run's held-out rows: evaluated before training, every `eval_steps`, and after, into the metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

from kdistill.config import RunConfig
from kdistill.data import Collator
from kdistill.objective.quality import held_out_quality, shard_batches
from kdistill.run.metrics import MetricsFile
from kdistill.teacher.forward import TeacherOutputs


class HeldOut:
    """This process's share of the held-out batches, and the sums over processes every guard agrees on.

    Attributes:
        before: the held-out quality before training (or, resumed, as the checkpoint recorded it).
        reduce: sums a tensor over processes (None in a single process).
        agree: the maximum of a tensor over processes (None in a single process).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: Any,
        parts: Any,
        cfg: RunConfig,
        collator: Collator,
        metrics: MetricsFile,
    ) -> None:
        self.accelerator, self.model, self.parts, self.cfg, self.metrics = (
            accelerator,
            model,
            parts,
            cfg,
            metrics,
        )
        # Validation rows sorted by length: the padding of an evaluation pass is then close to none.
        rows = sorted(parts.data.validation, key=lambda x: len(x.input_ids))
        size = cfg.training.eval_batch_size or cfg.training.batch_size
        batches = [collator(rows[i : i + size]) for i in range(0, len(rows), size)]
        world = accelerator.num_processes
        self.batches, self.counted = shard_batches(batches, accelerator.process_index, world)
        self.memo: dict[int, TeacherOutputs] = {}  # small: hidden states at response rows only
        self.before: dict[str, float] = {}
        self.reduce = self.agree = None
        if world > 1:
            self.reduce = self._on_all(lambda x: accelerator.reduce(x, "sum"))
            self.agree = self._on_all(lambda x: accelerator.gather(x).max())

    def _on_all(self, op: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: op(x.to(self.accelerator.device))

    def evaluate(self, step: int) -> dict[str, float]:
        """The student's held-out quality now, written to the metrics as `eval/...` at `step`."""
        device = self.accelerator.device
        result = held_out_quality(
            self.model,
            self.parts.teachers,
            ({k: v.to(device) for k, v in b.items()} for b in self.batches),
            self.cfg.loss.chunk_size,
            self.parts.vocab_size,
            self.memo,
            reduce=self.reduce,
            counted=self.counted,
            alignment=self.cfg.loss.alignment,
        )
        self.metrics.write(step, {f"eval/{k}": v for k, v in result.items()})
        return result
