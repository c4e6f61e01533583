"""What the training loop builds from accelerate and torch before its first step.

Kept out of `loop.py` so that the loop itself reads top to bottom.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from kdistill.train.swiglu import lean_gated_mlps


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


def adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """AdamW, fused where torch has a kernel for the parameters (the same update, issue #7).

    The fused kernel updates each tensor in one pass instead of about ten elementwise ops: on a
    SmolLM2 step on CPU the optimizer fell from 0.20 s to 0.055 s (benchmarks/vs_peers.py --profile).
    """
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Norm weights and biases are not decayed (the usual transformer recipe).
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # No empty group (a LoRA student has no trainable norm or bias): DeepSpeed drops empty groups from
    # the optimizer, and the scheduler, built before, would then step one group too many and fail.
    return [group for group in groups if group["params"]]


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


def sparse_tied_embedding(model: torch.nn.Module) -> bool:
    """Give a trained input embedding that is tied to the output head a sparse gradient; True if done.

    Dense, its backward fills a `(V, H)` zero tensor, writes the few rows of the batch's tokens and
    adds the whole tensor to the head's gradient: on SmolLM2 a 113 MB buffer and two passes over it
    per micro-batch. Sparse, autograd adds those rows into the head's dense gradient in place, so
    the parameter's gradient stays dense and exactly the same. Single process only (`lean_student`):
    the gradient hooks of DDP, FSDP and DeepSpeed expect dense contributions.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    tied = head is not None and isinstance(embedding, torch.nn.Embedding) and head.weight is embedding.weight
    if not tied or not embedding.weight.requires_grad:
        return False
    embedding.sparse = True
    return True


def lean_student(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """The single-process memory savings of issue #7 that change no number beyond float rounding.

    A tied embedding's gradient is sparse (`sparse_tied_embedding`) and plain gated MLPs keep half
    their activations (`swiglu.lean_gated_mlps`, fp32 only: without autocast in the way).
    """
    if not single_process(accelerator):
        return
    sparse_tied_embedding(model)
    if accelerator.mixed_precision == "no":
        lean_gated_mlps(model)
