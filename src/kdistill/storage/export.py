"""The trained student, written once: a loadable Hugging Face folder (or LoRA adapter) and its tokenizer."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.files import RunFiles, default_permissions, writing
from kdistill.losses.hidden import HiddenProjections
from kdistill.storage.checkpoint import kept_checkpoint, save_hidden


def write_student(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    tokenizer: Any,
    output_dir: Path,
    merge: bool,
    projections: Sequence[tuple[str, HiddenProjections]],
    sharded: bool,
) -> None:
    """Write `model` with `weights` (its whole state dict) and `tokenizer` into `output_dir`.

    Files go to a temporary folder first and are moved in with `config.json` (or `adapter_config.json`)
    last, so the folder is loadable only once it is complete. A sharded LoRA model merges a whole copy.
    """
    tmp = output_dir / ".student.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    kept = kept_checkpoint(output_dir / RunFiles.CHECKPOINTS)
    with writing("the trained student", tmp, kept, partial=[tmp]):
        model.save_pretrained(tmp, state_dict=_untied(model, weights))  # a PeftModel keeps its adapter only
        tokenizer.save_pretrained(tmp)
        save_hidden(projections, tmp)
        if merge and hasattr(model, "merge_and_unload"):
            merged = tmp / "merged"
            # merge_and_unload folds the adapter into the base weights in place: export is a run's last
            # step. A sharded model cannot merge in place: merge a whole copy built from the gathered weights.
            (_whole_copy(model, weights) if sharded else model).merge_and_unload().save_pretrained(merged)
            tokenizer.save_pretrained(merged)
    default_permissions(tmp)
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
