"""How much memory the student's vLLM engine needs: its KV cache sized for the rows an on-policy step
has in flight, and the processes it runs.

vLLM's default reserves a share of the device (on its CPU build, of RAM) for the KV cache, whatever
the run samples. kdistill instead gives it `--kv-cache-memory-bytes` from the memory plan: the keys
and values of every row in flight at the engine's longest sequence, in whole cache blocks, with a
margin. (`--kv-cache-memory-bytes` is byte-exact; the CPU build's older `VLLM_CPU_KVCACHE_SPACE`
counts whole GiB and, when set, wins, so the engine's environment leaves it out.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BLOCK_TOKENS = 128  # vLLM's CPU build: tokens per KV-cache block (its default there; CUDA's is 16)
KV_MARGIN = 1.25  # over the exact blocks: prefix-cache blocks, the scheduler's look-ahead
ENGINE_PROCESSES = 2  # vLLM's API server and its engine core (the model runs in the core)
# Each of them without the model: Python, torch and vLLM's modules, their heaps and threads (PSS;
# libraries both map are counted once between them).
ENGINE_PROCESS_BYTES = 700 * 2**20


@dataclass(frozen=True)
class EngineShape:
    """What the engine's memory depends on: its model's `layers`, `kv_heads`, `head_dim`, `params`
    (as the engine holds them: a tied head untied, so counted twice) and bytes per value (`dtype_bytes`)."""

    layers: int
    kv_heads: int
    head_dim: int
    params: int
    dtype_bytes: int = 4


def kv_cache_bytes(shape: EngineShape, rows: int, length: int, block: int = BLOCK_TOKENS) -> int:
    """The KV cache for `rows` sequences of up to `length` tokens: keys and values of every layer, each
    row in whole `block`-token blocks, times `KV_MARGIN`; a whole number of blocks."""
    per_block = 2 * block * shape.layers * shape.kv_heads * shape.head_dim * shape.dtype_bytes
    blocks = math.ceil(rows * math.ceil(length / block) * KV_MARGIN)
    return blocks * per_block


def engine_bytes(shape: EngineShape, rows: int, length: int) -> dict[str, int]:
    """The engine's processes by part: their own memory, the model's weights, the KV cache."""
    return {
        "processes": ENGINE_PROCESSES * ENGINE_PROCESS_BYTES,
        "weights": shape.params * shape.dtype_bytes,
        "KV cache": kv_cache_bytes(shape, rows, length),
    }


def shape_of_model(config: object, params: int, tied: bool, dtype_bytes: int) -> EngineShape:
    """The engine's shape from a transformers model config (`num_hidden_layers`, `num_key_value_heads`,
    `head_dim`): `params` parameters, the head counted again when `tied` (the engine unties it)."""
    heads = config.num_attention_heads  # type: ignore[attr-defined]
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads  # type: ignore[attr-defined]
    head = config.vocab_size * config.hidden_size if tied else 0  # type: ignore[attr-defined]
    layers = config.num_hidden_layers  # type: ignore[attr-defined]
    return EngineShape(layers, kv_heads, head_dim, params + head, dtype_bytes)


def shape_of_student(student: Any, tied: bool) -> EngineShape:
    """The engine's shape for `student` (a model or a PEFT model around one), written `tied` or not."""
    first = next(student.parameters())
    params = sum(p.numel() for p in student.parameters())
    return shape_of_model(student.config, params, tied, first.element_size())
