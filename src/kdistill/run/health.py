"""Health of a run: a loss that stops falling or explodes, KD and CE parts of very different scales,
and a held-out score that barely moved each log a warning with the troubleshooting advice; several
non-finite steps in a row stop the run."""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

import torch

from kdistill.run.guards import LOSS_ADVICE, QUALITY_ADVICE, GuardStop, Reduce

log = logging.getLogger("kdistill")


class HealthMonitor:
    """Watches the per-token training loss step by step, and the held-out score at the end.

    `kd_scale` is T^2 when both loss parts act (a teacher and 0 < alpha < 1), else None. Losses
    are summed over processes first (`reduce`), so every process takes the same decisions.
    """

    def __init__(
        self,
        window: int | None,
        explode_factor: float | None,
        max_bad_steps: int,
        ratio_limit: float | None,
        min_quality_gain: float | None,
        kd_scale: float | None,
        reduce: Reduce | None = None,
    ) -> None:
        self.window, self.explode_factor, self.max_bad_steps = window, explode_factor, max_bad_steps
        self.ratio_limit, self.min_quality_gain, self.kd_scale = ratio_limit, min_quality_gain, kd_scale
        self.reduce = reduce
        self.losses: deque[float] = deque(maxlen=2 * (window or 50))
        self.bad_in_row = self.skipped = 0
        self.quiet_until = {"plateau": 0, "explode": 0}
        self.ratio_warned = False

    def after_step(self, step: int, stats: dict[str, float], skipped: bool) -> bool:
        """Check one optimizer step; False when it was skipped (keep it out of the logged means)."""
        sums = torch.tensor([float(stats["loss"]), float(stats["trained"])], dtype=torch.float64)
        if self.reduce is not None:
            sums = self.reduce(sums)
        loss = float(sums[0] / max(float(sums[1]), 1.0))
        if skipped or not math.isfinite(loss):
            self._bad_step(step, loss)
            return False
        self.bad_in_row = 0
        self._check_explosion(step, loss)
        self.losses.append(loss)
        self._check_plateau(step)
        return True

    def _bad_step(self, step: int, loss: float) -> None:
        self.bad_in_row += 1
        self.skipped += 1
        what = f"the loss is {loss}" if not math.isfinite(loss) else "a gradient is NaN or infinite"
        if self.bad_in_row >= self.max_bad_steps:
            raise GuardStop(
                f"stopped at step {step}: {what}, {self.bad_in_row} steps in a row "
                f"(training.health.max_bad_steps={self.max_bad_steps}). {LOSS_ADVICE[0].upper()}"
                f"{LOSS_ADVICE[1:]}; then run again with --overwrite"
            )
        log.warning("step %d: %s; the step was skipped (no update, gradients zeroed)", step, what)

    def _check_explosion(self, step: int, loss: float) -> None:
        recent = list(self.losses)[-(self.window or 50) :]
        if self.explode_factor is None or len(recent) < 10 or step < self.quiet_until["explode"]:
            return
        mean = sum(recent) / len(recent)
        if loss > self.explode_factor * mean:
            self.quiet_until["explode"] = step + len(recent)
            log.warning(
                "step %d: the loss exploded to %.4g, %.0fx the mean of the last %d steps (%.4g); %s",
                step,
                loss,
                loss / mean,
                len(recent),
                mean,
                LOSS_ADVICE,
            )

    def _check_plateau(self, step: int) -> None:
        w = self.window
        if w is None or len(self.losses) < 2 * w or step < self.quiet_until["plateau"]:
            return
        history = list(self.losses)
        older, newer = sum(history[:w]) / w, sum(history[w:]) / w
        if newer >= older:
            self.quiet_until["plateau"] = step + w  # say it once a window, not every step
            log.warning(
                "step %d: the loss has not decreased over the last %d steps (mean %.4g, against %.4g over "
                "the %d steps before); %s",
                step,
                w,
                newer,
                older,
                w,
                LOSS_ADVICE,
            )

    def on_log(self, record: dict[str, float]) -> dict[str, float]:
        """Extra metrics for a logged window: `loss/kd_ce_ratio` (T^2 x KD over CE, what alpha weighs)."""
        extra: dict[str, float] = {}
        if self.skipped:
            extra["health/skipped_steps"] = float(self.skipped)
        if self.kd_scale is None or not record.get("loss/ce"):
            return extra
        kd = self.kd_scale * record["loss/kd"]
        ratio = extra["loss/kd_ce_ratio"] = kd / record["loss/ce"]
        limit = self.ratio_limit
        if limit is not None and not self.ratio_warned and ratio > 0 and not 1 / limit <= ratio <= limit:
            self.ratio_warned = True
            small, factor = ("KD", 1 / ratio) if ratio < 1 else ("CE", ratio)
            log.warning(
                "the %s part of the loss is %.0fx smaller than the other (T^2 x KD = %.4g, CE = %.4g), so "
                "alpha barely changes the balance between them; change loss.temperature (the KD part "
                "scales with it) or move loss.alpha towards the smaller part",
                small,
                factor,
                kd,
                record["loss/ce"],
            )
        return extra

    def check_quality(self, before: dict[str, float], after: dict[str, float]) -> None:
        """Warn when the held-out KL to the teacher (perplexity without one) barely fell."""
        key = "kl" if "kl" in before and "kl" in after else "ppl"
        if self.min_quality_gain is None or key not in before or key not in after or before[key] <= 0:
            return
        gain = 1 - after[key] / before[key]
        if gain < self.min_quality_gain:
            name = "KL to the teacher" if key == "kl" else "perplexity"
            log.warning(
                "held-out %s went from %.4g to %.4g (%+.1f%%); to keep more of the teacher: %s",
                name,
                before[key],
                after[key],
                -100 * gain,
                QUALITY_ADVICE,
            )


def build_health(
    cfg: Any, alpha: float, temperature: float, has_teacher: bool, reduce: Reduce | None
) -> HealthMonitor:
    """The monitor for `training.health` (a `HealthConfig`)."""
    both_parts = has_teacher and 0 < alpha < 1
    return HealthMonitor(
        window=cfg.window,
        explode_factor=cfg.explode_factor,
        max_bad_steps=cfg.max_bad_steps,
        ratio_limit=cfg.kd_ce_ratio,
        min_quality_gain=cfg.min_quality_gain,
        kd_scale=temperature**2 if both_parts else None,
        reduce=reduce,
    )
