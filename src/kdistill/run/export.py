"""The trained student gathered from every process and written once (`storage.export` writes it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from kdistill.losses.hidden import HiddenProjections
from kdistill.run.accelerator import whole_models
from kdistill.storage.checkpoint import copy_projections, is_sharded, under
from kdistill.storage.export import write_student


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
            write_student(model, under(full, "model."), tokenizer, output_dir, merge, copies, sharded)
    accelerator.wait_for_everyone()
