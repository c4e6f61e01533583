"""What kdistill reads off a loaded model, in one place: its base under LoRA, its text config, its
output head, and the device and mode it runs in."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def default_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT (LoRA) wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def copied_layers(model: nn.Module) -> list[int] | None:
    """The teacher's decoder layers a `from_teacher` student was copied from, in order (set when it was
    made in this process), or None."""
    return getattr(base_model(model), "kdistill_copied_layers", None)


def text_config(config: Any) -> Any:
    """A model config's text part: the config itself, or a multimodal model's text config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_width(config: Any) -> int:
    """A model config's output width."""
    return int(text_config(config).vocab_size)


def depth_and_width(config: Any) -> tuple[int, int]:
    """A model config's `(decoder layers, hidden size)`."""
    text = text_config(config)
    return int(text.num_hidden_layers), int(text.hidden_size)


def output_head(model: nn.Module, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's weight `(V, H)` and bias, cut to the shared vocabulary."""
    head = base_model(model).get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if vocab_size is not None and vocab_size < weight.shape[0]:  # else the parameter itself, not a view
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    return weight, bias


def softcap(model: nn.Module) -> float | None:
    """The final-logit soft-cap of Gemma-2-style models, None for the others."""
    return getattr(base_model(model).config, "final_logit_softcapping", None)


def for_inference(model: nn.Module, generate: bool = False) -> nn.Module:
    """Frozen and in eval mode; with `generate`, the KV cache back on (training turns it off)."""
    model.eval()
    model.requires_grad_(False)
    if generate:
        model.config.use_cache = True
    return model
