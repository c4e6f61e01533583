"""The checks of `training.on_policy` that need no weights: which teachers can grade the student's
samples, and where the student's engine can run. They are in `preflight.CHECKS` with the others."""

from __future__ import annotations

from pathlib import Path

from kdistill.errors import KdistillError
from kdistill.prerun.checked import Checked
from kdistill.teacher.roster import teacher_kind


def on_policy_possible(checked: Checked) -> None:
    """On-policy steps need a teacher that grades the student's samples: a cache holds only the
    sequences it was built from."""
    cfg = checked.cfg
    lmbda = cfg.training.on_policy.lmbda
    if lmbda == 0:
        return
    cached = [name for name, t in cfg.teacher_list() if not teacher_kind(t).grades_samples]
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


def engine_python_exists(checked: Checked) -> None:
    """engine vllm without a running server: kdistill starts vLLM with the configured Python."""
    o = checked.cfg.training.on_policy
    e = o.engine
    if o.lmbda > 0 and e.kind == "vllm" and e.server is None and not Path(e.python).exists():
        raise KdistillError(
            f"training.on_policy.engine.python={e.python!r}: no Python there to start the student's "
            "engine with; create vLLM's environment with `make vllm-env`, point the key at vLLM's Python, "
            "or give training.on_policy.engine.server (a running engine)"
        )


def engine_processes(checked: Checked) -> None:
    """The vLLM engine is synced from the main process's copy of the student: it must be whole there."""
    o, launch = checked.cfg.training.on_policy, checked.launch
    if o.engine.kind == "vllm" and o.lmbda > 0 and launch.processes > 1 and launch.sharded:
        raise KdistillError(
            f"training.on_policy.engine=vllm with {launch.processes} processes under {launch.kind}: the "
            "engine is synced from the main process's copy of the student, which FSDP and ZeRO-3 shard; "
            "use DDP or ZeRO-1/2, or engine: hf"
        )


def on_policy_vocabularies(checked: Checked) -> None:
    """`sampled` mode reads the teacher's log-prob of each token the student sampled, which a teacher of
    another tokenizer does not have (it reads other tokens); `divergence` mode re-aligns each response."""
    on, cross = checked.cfg.training.on_policy, checked.vocabs.cross
    if on.lmbda > 0 and on.mode == "sampled" and cross:
        raise KdistillError(
            "training.on_policy.mode=sampled with teacher(s) of another tokenizer "
            f"({', '.join(sorted(cross))}): that mode needs the teacher's log-prob of each token the "
            "student sampled, and such a teacher reads the response as other tokens; use mode: divergence "
            "(each response is re-aligned to the teacher's tokens) or same-tokenizer teachers"
        )
