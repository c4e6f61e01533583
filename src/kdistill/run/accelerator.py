"""How a run uses accelerate: whole models under ZeRO-3, mixed precision, trackers' hyperparameters,
and whether this is a single process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType


@contextlib.contextmanager
def whole_models(accelerator: Accelerator) -> Iterator[None]:
    """Load teacher and student whole, even under DeepSpeed ZeRO-3.

    accelerate registers its DeepSpeed config with transformers, so under ZeRO-3 every model loaded
    afterwards would be partitioned at load time, the frozen teacher included (it is never prepared,
    so nothing would gather its weights). The student is partitioned later, by `accelerator.prepare`.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def flat_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"training.learning_rate": 5e-05, ...}`: trackers such as TensorBoard take flat scalars only."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def mixed_precision(name: str) -> str:
    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def single_process(accelerator: Accelerator) -> bool:
    """No DDP, FSDP or DeepSpeed: nothing hooks the gradients or gathers weights per called module."""
    return accelerator.distributed_type == DistributedType.NO
