"""One interface for what gives a training step its rows, as verl's `BaseRollout` is for rollouts.

A `Sampler` gives each step the rows it trains on (`rows`): the window as the data loader cut it, or,
on an on-policy step, the same prompts with responses the student wrote. The loop holds one and
never asks which:

- `PassThrough`: off-policy runs (`training.on_policy.lmbda: 0`); every window as it is;
- `InProcess` (`engine: hf`): transformers' generate in the training process;
- `EngineSampler` (`engine: vllm`, `sampling/engine_sampler.py`): the student's vLLM engine;
- `OverlapSampler` (`engine: vllm` with `overlap`): that engine sampling a step ahead.

What every on-policy sampler shares is done once, in `OnPolicy.rows`: the step's coin, the prompts
and seeds, the re-collation of the responses into ordinary batches, and the re-alignment for teachers
of another tokenizer. A sampler only says how it writes responses (`_write`), and what it does
before (`_sync`: the engine's weights).

To add a sampler: subclass `OnPolicy`, write `_write` (and `_sync` if it holds weights of its own),
and pick it in `settings.build_sampler`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kdistill.data import Collator
from kdistill.sampling.cross_samples import TeacherViews
from kdistill.sampling.generate import (
    Rows,
    Sampling,
    is_on_policy,
    rows_per_call,
    step_seed,
    write_in_process,
    written_window,
)

Window = list[dict[str, torch.Tensor]]  # one optimizer step's micro-batches


@dataclass
class StepRows:
    """The rows a step trains on: `sampled` when the student wrote their responses; `stats`, the
    generation's sums for the metrics (`gen_*`; empty on a step that did not sample)."""

    window: Window
    sampled: bool = False
    stats: dict[str, float] = field(default_factory=dict)


class Sampler:
    """Gives each optimizer step its rows. `with sampler:` starts what it needs (an engine) and stops
    it however the block ends; `restore` (before `with`) puts back what a checkpoint kept (`state`)."""

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def rows(self, window: Window, step: int) -> StepRows:
        """The rows optimizer step `step` trains on, for its window `window` (as the back-off cut it)."""
        raise NotImplementedError

    def send_ahead(self, upcoming: Window | None, step: int) -> dict[str, float]:
        """Start on the rows of step `step` (its window `upcoming`, None after the last step) while
        this step trains; the seconds it took (`gen_sync_seconds`). Most samplers do nothing."""
        return {}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this sampler (every process calls it)."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Before `with`: put back what a checkpoint's state holds (its `step`, and `state()`'s keys)."""
        return None


class PassThrough(Sampler):
    """Off-policy training: every step trains on its window as it is."""

    def rows(self, window: Window, step: int) -> StepRows:
        return StepRows(window)


@dataclass(frozen=True)
class OnPolicyParts:
    """What every on-policy sampler needs: the settings, the student (unwrapped), the collator, the
    run's seed, this process `(index, count)`, and the re-alignment for other tokenizers."""

    sampling: Sampling
    student: Any
    collator: Collator
    seed: int
    process: tuple[int, int] = (0, 1)
    views: TeacherViews = field(default_factory=TeacherViews)


class OnPolicy(Sampler):
    """A step is on-policy with probability `lmbda` (a coin seeded by the run's seed and the step, the
    same on every process and on resume); then the student writes the window's responses."""

    def __init__(self, parts: OnPolicyParts) -> None:
        self.parts = parts

    def rows(self, window: Window, step: int) -> StepRows:
        p = self.parts
        if not is_on_policy(p.sampling.lmbda, p.seed, step):
            return StepRows(window)
        synced = self._sync(step)
        # The samples differ per step and per batch; each process writes for its own rows.
        seed = step_seed(p.seed, step)
        written, sums = written_window(window, p.sampling, p.collator, seed, p.process, self._write)
        return StepRows(p.views.apply(window, written, p.collator), True, {**sums, **synced})

    def _sync(self, step: int) -> dict[str, float]:
        """Before step `step` samples: bring the sampler's weights up to date; the sums it logs."""
        return {}

    def _write(self, prompts: Rows, seeds: list[int]) -> Rows:
        """Each batch's responses to its prompts, row r of a batch with seed s from `row_seed(s, r)`."""
        raise NotImplementedError


class InProcess(OnPolicy):
    """`engine: hf`: the student samples in the training process, always with the current weights.
    Its rows per generate call shrink with the micro-batch (`micro()`, `batch_size` rows at most),
    which the out-of-memory back-off may lower (`generate.rows_per_call`)."""

    def __init__(self, parts: OnPolicyParts, batch_size: int, micro: Callable[[], int]) -> None:
        super().__init__(parts)
        self.batch_size, self.micro = batch_size, micro

    def _write(self, prompts: Rows, seeds: list[int]) -> Rows:
        s = self.parts.sampling
        group = rows_per_call(s.generation_batch_size, self.batch_size, self.micro())
        return write_in_process(self.parts.student, prompts, seeds, s, group)
