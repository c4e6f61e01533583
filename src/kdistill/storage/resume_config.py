"""What `--resume` does with a config that differs from the one the run ran with.

Each checkpoint keeps the resolved config it was written under (`RunFiles.CONFIG` inside
`step-N/`). On `--resume` every difference from it is listed. A change that alters what is trained
(models, data, loss, on-policy settings, tokenizer, cache, seed, batch and accumulation, learning
rate and its schedule) is refused, naming each key with its old and new values, unless `--force` is
given. A change that does not (more steps, epochs or minutes, logging, save and eval cadence, trackers,
health thresholds) is applied and printed. Either way the run folder's `config_history.yaml` records the
config before and after, and the step from which the new one applies; `kdistill_config.yaml` stays the
config now in force, which `kdistill eval` and `report` read.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kdistill.errors import KdistillError
from kdistill.files import RunFiles, write_atomic

log = logging.getLogger("kdistill")

HISTORY = "config_history.yaml"

# Keys that change how the run is watched, kept or stopped, not what each step computes.
_CADENCE = {
    "output_dir",  # a run folder moved or copied elsewhere
    "training.logging_steps",
    "training.save_steps",
    "training.save_total_limit",
    "training.eval_steps",
    "training.eval_batch_size",
    "training.report_to",
    "training.micro_batch_size",  # the effective batch and the per-token normalisation stay the same
    "training.gradient_checkpointing",  # recomputes activations; the gradients are the same
}
# Applied only when they extend the run.
_LENGTH = ("training.max_steps", "training.num_epochs", "training.max_minutes")


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` as `{"a.b": 1}`; lists are values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between two resolved configs: `{key: (old, new)}`."""
    before, after = flat(old), flat(new)
    keys = sorted(before.keys() | after.keys())
    return {k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)}


def _harmless(key: str, old: Any, new: Any) -> bool:
    if key in _CADENCE or key.startswith("training.health."):
        return True
    return key in _LENGTH and old is not None and new is not None and new >= old


def _listed(found: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in found.items())


def saved_config(checkpoint: Path, out: Path) -> tuple[dict[str, Any], Path]:
    """The config `checkpoint` was written under; a checkpoint without one, the run folder's config."""
    path = checkpoint / RunFiles.CONFIG
    path = path if path.is_file() else out / RunFiles.CONFIG
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}, path


def check_resume_config(
    checkpoint: Path, step: int, out: Path, current: dict[str, Any], force: bool
) -> Callable[[], None] | None:
    """Compare `current` with the config of `checkpoint` (step `step`); refuse, apply or force (see above).

    Changes nothing: returns what records a kept change in `out/config_history.yaml` (the main process
    calls it once the run has loaded), or None without a change.
    """
    old, path = saved_config(checkpoint, out)
    if not old:
        return None
    found = changes(old, current)
    altering = {k: v for k, v in found.items() if not _harmless(k, *v)}
    if altering and not force:
        raise KdistillError(
            f"--resume: this config changes what the run being resumed trains: {_listed(altering)} (its "
            f"config: {path}). Resume with its values, add --force to continue from step {step} with "
            "these anyway (config_history.yaml then records both), or --overwrite to start again"
        )
    if altering:
        log.warning("--resume --force: from step %d, training with %s", step, _listed(altering))
    applied = {k: v for k, v in found.items() if k not in altering}
    if applied:
        log.info("--resume: applied from step %d: %s", step, _listed(applied))
    if not found:
        return None
    return functools.partial(record_change, out, old, current, step, found, bool(altering))


def record_change(
    out: Path,
    old: dict[str, Any],
    new: dict[str, Any],
    step: int,
    found: dict[str, tuple[Any, Any]],
    forced: bool,
) -> None:
    """Append to `out/config_history.yaml`: the config from `step` on, and what changed (the first
    entry, written with the first change, is the config the run began with, from step 0)."""
    path = out / HISTORY
    history = yaml.safe_load(path.read_text()) if path.is_file() else None
    history = history or [{"from_step": 0, "config": old}]
    changed = {key: {"old": before, "new": after} for key, (before, after) in found.items()}
    history.append({"from_step": step, "forced": forced, "changed": changed, "config": new})
    write_atomic(path, yaml.safe_dump(history, sort_keys=False))
