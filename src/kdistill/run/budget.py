"""A run's wall-clock budget (`training.max_minutes`) and the learning-rate schedule that follows it.

The budget counts the seconds spent inside the training loop: each step with its teacher forwards and
on-policy generation, and the loop's own held-out evaluations and checkpoints. Loading the models,
the held-out measurements before and after training and the export are not counted. Each checkpoint
keeps the seconds spent (`train_seconds` in its state), so `--resume` goes on with what is left.

Under a budget the number of steps is not known in advance, so the cosine decay follows the share of
the run already done, measured both ways: `max(steps done / total steps, seconds spent / budget)`.
Whichever limit is nearer drives the decay, and the learning rate reaches zero at the limit that
stops the run (the budget on a slow machine, max_steps or num_epochs on a fast one).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

now: Callable[[], float] = time.monotonic  # the clock, in seconds; the tests replace it

Agree = Callable[[torch.Tensor], torch.Tensor]  # the maximum over processes


class TimeBudget:
    """Seconds of training spent so far (`spent_before` of them before a resume) against `minutes`.

    Without `minutes` (None) the run has no time limit: `fraction` is 0 and `exhausted` False.
    """

    def __init__(self, minutes: float | None, spent_before: float = 0.0) -> None:
        self.limit = None if minutes is None else minutes * 60.0
        self.spent_before = spent_before
        self._since: float | None = None

    def start(self) -> None:
        """Start the clock (the first step of this process's part of the run is about to run)."""
        self._since = now()

    def stop(self) -> None:
        """Stop the clock: the training loop is over, `seconds` stays what it spent."""
        self.spent_before, self._since = self.seconds(), None

    def seconds(self) -> float:
        """Training seconds spent, those before a resume included."""
        return self.spent_before + (0.0 if self._since is None else now() - self._since)

    def fraction(self) -> float:
        """The share of the budget spent (0 without a budget)."""
        return 0.0 if self.limit is None else self.seconds() / self.limit

    def exhausted(self, agree: Agree | None = None) -> bool:
        """True once the budget is spent, agreed by all processes (`agree`: the maximum over them)."""
        if self.limit is None:
            return False
        spent = self.seconds() >= self.limit
        if agree is None:
            return spent
        return bool(agree(torch.tensor([float(spent)], dtype=torch.float64)).item())


def budget_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, budget: TimeBudget
) -> LambdaLR:
    """Linear warm-up for `warmup_steps`, then cosine decay to 0 over the nearer of `total_steps` and
    the time budget (see the module docstring). Without a budget it is transformers' cosine schedule
    (`get_cosine_schedule_with_warmup`), which runs without one use."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        by_steps = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, max(by_steps, budget.fraction()))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
