"""The engine's copy of the student: the folder vLLM serves, and its weights file rewritten at each sync.

The first write is a safetensors file put in place by one rename. Later syncs of the same tensors
(every sync of a full student: names, dtypes and shapes do not change) copy each tensor's bytes into
its place in that file, through a shared memory map: no serialisation buffer, no new file, and the
engine reads the new bytes from the page cache. safetensors has no such in-place update, hence the
few lines here. The engine reads the file only when asked to reload, after the copy has finished.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

WEIGHTS = "model.safetensors"
CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}  # safetensors' dtype names


def write_base(student: Any, tokenizer: Any, folder: Path, lora: bool) -> bool:
    """The folder vLLM starts from: config, tokenizer and weights (a LoRA student's base weights).
    Returns whether the head is tied to the embedding (the engine then serves it untied, written out)."""
    model = student.get_base_model() if lora else student
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    write_weights(student, folder, base_only=lora)
    return tied


def write_weights(student: Any, folder: Path, base_only: bool = False) -> None:
    """`folder/model.safetensors` holding the student's weights in the checkpoint's names: a LoRA
    student's base layers without their adapters, a tied head written out. In place when the file
    holds the same tensors already, else a new file put in place by one rename."""
    state = student.get_base_model().state_dict() if base_only else student.state_dict()
    weights = {}
    for name, tensor in state.items():
        if "lora_" in name:
            continue
        weights[name.replace(".base_layer.", ".")] = tensor.detach().to("cpu").contiguous()
    path = folder / WEIGHTS
    if path.exists() and _copy_in_place(weights, path):
        return
    if "lm_head.weight" in weights:
        weights["lm_head.weight"] = weights["lm_head.weight"].clone()  # safetensors refuses shared storage
    part = folder / f".{WEIGHTS}.part"
    save_file(weights, str(part), metadata={"format": "pt"})
    part.replace(path)


def _copy_in_place(weights: dict[str, torch.Tensor], path: Path) -> bool:
    """Each tensor's bytes copied over its own in the safetensors file `path`; False (nothing written)
    unless the file holds exactly these names, dtypes and shapes."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        if header.keys() != weights.keys() or any(
            CODES.get(t.dtype) != header[n]["dtype"] or list(t.shape) != header[n]["shape"]
            for n, t in weights.items()
        ):
            return False
        with mmap.mmap(f.fileno(), 0) as mapped:
            data = torch.frombuffer(mapped, dtype=torch.uint8)
            for name, tensor in weights.items():
                begin, end = header[name]["data_offsets"]
                data[8 + size + begin : 8 + size + end].copy_(tensor.reshape(-1).view(torch.uint8))
            del data  # the map closes only once no tensor views it
    return True
