"""Checkpoints that are either complete or absent.

A checkpoint is written into `step-N.tmp/` and renamed to `step-N/` only once every file is in
place, so `--resume` never picks up a half-written one.

Every process calls `save_checkpoint`, `load_checkpoint` and `export_student`: under FSDP and
DeepSpeed no process holds the whole student or its optimizer state, so saving is collective
(accelerate's `save_state` and `get_state_dict`); only the main process writes kdistill's own files.
One process, or DDP, keeps the small format below (only trainable weights, e.g. the LoRA adapter).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import nn

from kdistill.errors import KdistillError
from kdistill.files import RunFiles, default_permissions, writing
from kdistill.losses.hidden import HiddenProjections, load_projections, projections_filename, save_projections
from kdistill.models.loading import damaged_weights
from kdistill.storage.rng import rng_state, set_rng_state
from kdistill.storage.tensor_files import load_tensors, tensors_only

_STEP_DIR = re.compile(r"^step-(\d+)$")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters lists a tied weight once, which safetensors requires.
    return {
        n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def is_sharded(accelerator: Accelerator) -> bool:
    """FSDP or DeepSpeed: the student's weights or its optimizer state are split across processes."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def save_checkpoint(
    folder: Path,
    step: int,
    accelerator: Accelerator,
    student: nn.Module,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    keep: int | None,
    projections: Sequence[tuple[str, HiddenProjections]] = (),
    config: str = "",
) -> Path:
    """Write `folder/step-N/` (weights, projections, optimizer, RNG, state); every process calls it.

    `student` is the prepared `StudentHidden`; `projections` pairs each teacher's name with its
    module in `student.projections`; `config` is the resolved config (YAML) the run trains with, kept
    beside the weights for `--resume` to compare with (`resume_config.py`). Sharded runs store
    accelerate's `save_state` (each process's shards or the gathered weights, the optimizer, each
    process's RNG) with the scheduler beside it.
    """
    final, tmp = folder / f"step-{step:07d}", folder / f"step-{step:07d}.tmp"
    main = accelerator.is_main_process
    # A failed write raises here. The other processes are not told: under `accelerate launch`, torchrun
    # stops them when one process fails (tests/storage/test_disk_full.py launches two).
    _write_checkpoint(tmp, main, step, accelerator, student, optimizer, scheduler, state, projections, config)
    if main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(folder, keep)
    accelerator.wait_for_everyone()  # no process may go on (or exit) before the checkpoint is complete
    return final


def _write_checkpoint(
    tmp: Path,
    main: bool,
    step: int,
    accelerator: Accelerator,
    student: nn.Module,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    projections: Sequence[tuple[str, HiddenProjections]],
    config: str,
) -> None:
    """Every file of `step-N.tmp/`; a failed write removes it and raises one `KdistillError`."""
    with writing(f"checkpoint step {step}", tmp, kept_checkpoint(tmp.parent), partial=[tmp] if main else []):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()  # the folder exists before any process writes into it
        if is_sharded(accelerator):
            accelerator.save_state(str(tmp))  # each process ends by writing its own RNG file, unsynchronised
            projections = _gathered_projections(accelerator, student, projections)
            accelerator.wait_for_everyone()  # so every process has written before the folder is renamed
        if main and is_sharded(accelerator):
            _save({"scheduler": scheduler.state_dict()}, tmp / "scheduler.pt")
        elif main:
            weights = trainable_state(accelerator.unwrap_model(student).model)
            save_file(weights, str(tmp / "trainable.safetensors"))
            optim = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            _save(optim, tmp / "optim.pt")
            _save(rng_state(), tmp / "rng.pt")
        if main:
            save_hidden(projections, tmp)
            (tmp / RunFiles.CONFIG).write_text(config)
            # state.json is written last: it marks the checkpoint complete (see latest_checkpoint).
            (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
            default_permissions(tmp)


def _save(value: Any, path: Path) -> None:
    # Through a Python file: a failed write then carries the OS's error (errno) as its context;
    # torch.save given a path raises only its C++ writer's "unexpected pos".
    with path.open("wb") as handle:
        torch.save(value, handle)


def kept_checkpoint(folder: Path, fix: str = "free some space") -> str:
    """What a failure leaves to continue from: the newest complete checkpoint, if any; `fix` says what
    to do first (for a failed write, free some space)."""
    last = latest_checkpoint(folder)
    if last is None:
        return (
            f"No checkpoint was saved before it, so no step is kept: {fix}, then run the same "
            "`kdistill train` command again (it takes this folder over)"
        )
    return f"The previous checkpoint {last} is intact: {fix}, then continue from it with --resume"


def latest_checkpoint(folder: Path) -> Path | None:
    found = []
    for path in folder.glob("step-*"):
        match = _STEP_DIR.match(path.name)
        if match and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def check_writable(out: Path) -> None:
    """Fail now, with the folder named, if the run could not write its outputs."""
    if out.exists() and not out.is_dir():
        raise KdistillError(f"output_dir {out} exists and is not a folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    try:
        # A real write, not os.access: root passes os.access on read-only folders and file systems.
        fd, probe = tempfile.mkstemp(prefix=".kdistill-write-test", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise KdistillError(
            f"output_dir {out} cannot be written: {existing} is not writable ({err.strerror}); "
            "choose another output_dir or change the folder's permissions"
        ) from None


def remove_partial(folder: Path) -> None:
    """Delete `step-N.tmp/` folders left by a run killed while writing a checkpoint."""
    for path in folder.glob("step-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    path: Path,
    accelerator: Accelerator,
    student: nn.Module,
    optimizer: Any,
    scheduler: Any,
    projections: Sequence[tuple[str, HiddenProjections]] = (),
) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote into the given objects; returns its `state.json`.

    Every process calls it with the prepared `student` and `optimizer`.
    """
    sharded, written_sharded = is_sharded(accelerator), not (path / "trainable.safetensors").is_file()
    if sharded != written_sharded:
        how = "under FSDP or DeepSpeed" if written_sharded else "by one process or DDP"
        raise KdistillError(
            f"--resume: checkpoint {path} was written {how}; resume it the same way, or --overwrite"
        )
    saved = load_hidden(projections, path)  # first: a changed loss.hidden gets its own message
    if sharded:  # the projections' values come back with the student's shards
        with tensors_only(accelerator, path):
            accelerator.load_state(str(path))
        scheduler.load_state_dict(load_tensors(path / "scheduler.pt")["scheduler"])
        return json.loads((path / "state.json").read_text())
    for (_, current), loaded in zip(projections, saved):
        current.load_state_dict(loaded.state_dict())
    try:
        weights = load_file(str(path / "trainable.safetensors"))
    except Exception as err:  # safetensors raises its own error types for a short or damaged file
        damaged = damaged_weights(path) or f"{path / 'trainable.safetensors'} cannot be read ({err})"
        raise KdistillError(
            f"--resume: checkpoint {path}: {damaged}. Remove {path} to resume from the checkpoint before it, "
            "or --overwrite to start again"
        ) from None
    params = dict(accelerator.unwrap_model(student).model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optim = load_tensors(path / "optim.pt")
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    set_rng_state(load_tensors(path / "rng.pt"))
    return json.loads((path / "state.json").read_text())


def _hidden_file(name: str, several: bool) -> str:
    return projections_filename(name if several else None)


def save_hidden(projections: Sequence[tuple[str, HiddenProjections]], folder: Path) -> None:
    """Each teacher's projections as `hidden_projections.safetensors` (`.NAME.` among several teachers)."""
    for name, module in projections:
        save_projections(module, folder, _hidden_file(name, len(projections) > 1))


def load_hidden(
    projections: Sequence[tuple[str, HiddenProjections]], folder: Path
) -> list[HiddenProjections]:
    """The projections saved in `folder`, in the order of `projections`; refused if loss.hidden differs."""
    saved = sorted(p.name for p in folder.glob("hidden_projections*.safetensors"))
    wanted = [_hidden_file(name, len(projections) > 1) for name, _ in projections]
    if saved != sorted(wanted):
        raise KdistillError(
            f"--resume: checkpoint {folder} holds hidden-state projections {saved or 'none'}, but this "
            f"config needs {wanted or 'none'}: loss.hidden (on or off) and the teachers must stay as the run "
            "began. Resume with its settings, or --overwrite to start again"
        )
    found = []
    for (_, current), filename in zip(projections, wanted):
        loaded = load_projections(folder, filename)
        shape = (loaded.pairs, loaded.student_size, loaded.teacher_size)
        if shape != (current.pairs, current.student_size, current.teacher_size):
            raise KdistillError(
                f"--resume: {folder / filename} pairs layers {loaded.pairs} ({loaded.student_size} -> "
                f"{loaded.teacher_size}), this config {current.pairs} ({current.student_size} -> "
                f"{current.teacher_size}); resume with the run's loss.hidden.layers, or --overwrite"
            )
        found.append(loaded)
    return found


def _gathered_projections(
    accelerator: Accelerator, student: nn.Module, projections: Sequence[tuple[str, HiddenProjections]]
) -> list[tuple[str, HiddenProjections]]:
    """Whole copies of sharded projections, on the main process (others get empty ones); collective."""
    if not projections:
        return []
    full = accelerator.get_state_dict(student)
    return [(name, copy_projections(p, full, f"projections.{i}.")) for i, (name, p) in enumerate(projections)]


def copy_projections(
    module: HiddenProjections, full: dict[str, torch.Tensor], prefix: str
) -> HiddenProjections:
    copy = HiddenProjections(module.pairs, module.student_size, module.teacher_size)
    if full:  # empty on processes other than the main one
        copy.load_state_dict(under(full, prefix))
    return copy


def under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` whose key starts with `prefix`, with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _prune(folder: Path, keep: int | None) -> None:
    if keep is None:
        return
    done = sorted(p for p in folder.glob("step-*") if _STEP_DIR.match(p.name))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
