"""The trained student, written once: a loadable Hugging Face folder (or LoRA adapter) and its tokenizer."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from kdistill.losses.hidden import HiddenProjections
from kdistill.run.accelerator import whole_models
from kdistill.run.checkpoint import copy_projections, is_sharded, save_hidden, under


def export_student(
    accelerator: Accelerator,
    student: nn.Module,
    tokenizer: Any,
    output_dir: Path,
    merge: bool,
    projections: Sequence[tuple[str, HiddenProjections]] = (),
) -> None:
    """Save the student (LoRA adapter or full model) and its tokenizer into `output_dir`.

    Every process calls it: the weights are the gathered state dict of the prepared `StudentHidden`
    (whole under FSDP and ZeRO-3, where each process holds a shard), written by the main one.
    Files go to a temporary folder first and are moved in with `config.json` (or
    `adapter_config.json`) last, so the folder is loadable only once it is complete. Hidden-state
    projections go beside the student in their own file: they are training aids, not part of it.
    """
    full = accelerator.get_state_dict(student)  # collective: every process sends its shards
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(student).model
        copies = [(n, copy_projections(p, full, f"projections.{i}.")) for i, (n, p) in enumerate(projections)]
        # Outside ZeRO-3's load-time partitioning: a merged LoRA student is built anew from the
        # gathered weights here, on this process alone; under `deepspeed.zero.Init` that model would
        # be partitioned with collectives the other processes never join, and the run would hang.
        with whole_models(accelerator):
            sharded = is_sharded(accelerator)
            _write_student(model, under(full, "model."), tokenizer, output_dir, merge, copies, sharded)
    accelerator.wait_for_everyone()


def _write_student(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    tokenizer: Any,
    output_dir: Path,
    merge: bool,
    projections: Sequence[tuple[str, HiddenProjections]],
    sharded: bool,
) -> None:
    tmp = output_dir / ".student.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=_untied(model, weights))  # a PeftModel keeps its adapter only
    tokenizer.save_pretrained(tmp)
    save_hidden(projections, tmp)
    if merge and hasattr(model, "merge_and_unload"):
        merged = tmp / "merged"
        # merge_and_unload folds the adapter into the base weights in place: export is a run's last step.
        # A sharded model cannot merge in place: merge a whole copy built from the gathered weights.
        (_whole_copy(model, weights) if sharded else model).merge_and_unload().save_pretrained(merged)
        tokenizer.save_pretrained(merged)
    markers = {"config.json", "adapter_config.json"}
    items = sorted(tmp.iterdir(), key=lambda p: p.name in markers)
    for item in items:
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.rename(target)
    tmp.rmdir()


def _untied(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` with each parameter that `model` shares (a tied head) under its first name only.

    Gathered weights are copies, so a tied head no longer shares the embedding's storage and
    `save_pretrained` would write it twice.
    """
    kept = {name for name, _ in model.named_parameters()}
    shared = {name for name, _ in model.named_parameters(remove_duplicate=False)} - kept
    return {k: v for k, v in weights.items() if k not in shared}


def _whole_copy(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A new PeftModel like `model` that holds `weights` (its whole state dict) on the CPU.

    Built on the meta device and given the gathered tensors themselves (`assign=True`): no second
    copy of the weights and no random initialisation.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(model.get_base_model().config)
        copy = get_peft_model(base, model.peft_config[model.active_adapter])
    copy.load_state_dict(weights, assign=True)
    copy.get_base_model().tie_weights()  # assign replaced the shared tensor on one side only
    return copy
