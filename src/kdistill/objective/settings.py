"""`loss` as the plain values the objective takes."""

from __future__ import annotations

from kdistill.config import RunConfig
from kdistill.losses import LOSSES
from kdistill.objective.batch import LossSettings


def loss_settings(cfg: RunConfig, vocab_size: int | None) -> LossSettings:
    """The loss's plain values from `cfg.loss`, with the logit width the heads share."""
    loss = cfg.loss
    # The chosen divergence's registered parameters, each a field of `loss` (config/loss.py).
    params = {name: getattr(loss, name) for name in LOSSES[loss.divergence].params}
    return LossSettings(
        alpha=loss.alpha,
        temperature=loss.temperature,
        divergence=loss.divergence,
        divergence_kwargs=params,
        chunk_size=loss.chunk_size,
        vocab_size=vocab_size,
        multi_teacher=loss.multi_teacher,
        hidden_weight=loss.hidden.weight,
        hidden_distance=loss.hidden.distance,
        alignment=loss.alignment,
    )
