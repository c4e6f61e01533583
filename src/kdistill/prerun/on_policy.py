"""The checks of `training.on_policy` that need no weights: which teachers can grade the student's samples."""

from __future__ import annotations

from typing import Any

from kdistill.config import RunConfig
from kdistill.errors import KdistillError


def check_on_policy(cfg: RunConfig) -> None:
    """On-policy steps need a live teacher: a cache holds only the sequences it was built from."""
    lmbda = cfg.training.on_policy.lmbda
    if lmbda == 0:
        return
    cached = [name for name, t in cfg.teacher_list() if t.cache is not None]
    if len(cached) == len(cfg.teacher_list()):
        raise KdistillError(
            f"training.on_policy.lmbda={lmbda:g} trains on responses the student writes during training, "
            "but every teacher is a cache, which can only score the sequences it was built from; give a "
            "live teacher (teacher.model without teacher.cache) or set training.on_policy.lmbda: 0"
        )
    if cached and lmbda == 1:
        raise KdistillError(
            f"training.on_policy.lmbda=1 leaves no step for the cached teacher(s) {', '.join(cached)} "
            "(a cache cannot score the student's own responses, and only off-policy steps read it); "
            "use lmbda < 1 or remove those teachers"
        )
    served = [name for name, t in cfg.teacher_list() if t.server]
    if served and cfg.training.on_policy.mode == "sampled" and cfg.loss.temperature != 1.0:
        raise KdistillError(
            f"training.on_policy.mode=sampled with the served teacher(s) {', '.join(served)} needs "
            f"loss.temperature: 1 (got {cfg.loss.temperature:g}): a server gives each sampled token's "
            "log-prob at T = 1, and a tempered one needs the whole distribution; set loss.temperature: 1 "
            "or mode: divergence"
        )
    if cfg.loss.alpha == 0:
        raise KdistillError(
            "training.on_policy.lmbda > 0 with loss.alpha=0: a generated batch has no CE term, so it would "
            "train nothing; set loss.alpha > 0"
        )


def check_on_policy_vocabularies(cfg: RunConfig, cross: dict[str, Any]) -> None:
    """`sampled` mode reads the teacher's log-prob of each token the student sampled, which a teacher of
    another tokenizer does not have (it reads other tokens); `divergence` mode re-aligns each response."""
    on = cfg.training.on_policy
    if on.lmbda > 0 and on.mode == "sampled" and cross:
        raise KdistillError(
            "training.on_policy.mode=sampled with teacher(s) of another tokenizer "
            f"({', '.join(sorted(cross))}): that mode needs the teacher's log-prob of each token the "
            "student sampled, and such a teacher reads the response as other tokens; use mode: divergence "
            "(each response is re-aligned to the teacher's tokens) or same-tokenizer teachers"
        )
