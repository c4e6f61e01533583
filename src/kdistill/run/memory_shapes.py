"""What the memory estimate reads: a model's shape (from its config.json or kdistill's table of known
models), and a device's memory (a size such as `24GB` or a GPU name)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kdistill.errors import KdistillError
from kdistill.models.parts import text_config

# Architectures whose MLP is two matrices (up, down) rather than the gated three (gate, up, down).
_PLAIN_MLP = {"phi", "gpt2", "gpt_neox", "gptj", "opt", "falcon", "starcoder2", "bloom"}


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only model that its memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated: bool

    def layer_params(self) -> int:
        """Weights of one decoder layer (attention and MLP; norms and biases are negligible)."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attention + (3 if self.gated else 2) * self.hidden * self.intermediate

    def embedding_params(self) -> int:
        """The input embedding and, when untied, the output head."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def params(self, layers: int | None = None) -> int:
        return (self.layers if layers is None else layers) * self.layer_params() + self.embedding_params()

    def linear_shapes(self) -> list[tuple[int, int]]:
        """`(in, out)` of each linear layer of one decoder layer (what `all-linear` LoRA wraps)."""
        h, i, q, kv = (
            self.hidden,
            self.intermediate,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        )
        mlp = [(h, i), (h, i), (i, h)] if self.gated else [(h, i), (i, h)]
        return [(h, q), (h, kv), (h, kv), (q, h), *mlp]


def shape_of(config: Any) -> Shape:
    """A transformers config (or a dict of config.json's keys) as a `Shape`."""
    c = text_config(config) if not isinstance(config, dict) else _Dict(config)
    heads = int(c.num_attention_heads)
    hidden = int(c.hidden_size)
    return Shape(
        layers=int(c.num_hidden_layers),
        hidden=hidden,
        intermediate=int(c.intermediate_size),
        heads=heads,
        kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(c, "head_dim", None) or hidden // heads),
        vocab=int(c.vocab_size),
        tied=bool(getattr(c, "tie_word_embeddings", False)),
        gated=str(getattr(c, "model_type", "")) not in _PLAIN_MLP,
    )


class _Dict:
    def __init__(self, values: dict) -> None:
        self.__dict__.update(values)


# config.json's numbers of well-known hub models, so the estimate works offline (as KNOWN_VOCABULARIES
# does for their tokenizers).
KNOWN_ARCHITECTURES: dict[str, dict] = {
    "mistralai/Mistral-7B-v0.1": dict(
        model_type="mistral", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
    ),
    "mistralai/Mistral-7B-Instruct-v0.2": dict(
        model_type="mistral", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
    ),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
    ),
    "microsoft/phi-2": dict(
        model_type="phi", num_hidden_layers=32, hidden_size=2560, intermediate_size=10240,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=51200, tie_word_embeddings=False,
    ),
}  # fmt: skip

# Memory of common GPUs, in GB (10^9 bytes) as sold.
GPUS = {
    "T4": 16, "L4": 24, "A10": 24, "A10G": 24, "RTX3090": 24, "RTX4090": 24, "L40S": 48, "A6000": 48,
    "A100-40GB": 40, "A100": 80, "A100-80GB": 80, "H100": 80, "H100-80GB": 80, "H200": 141,
}  # fmt: skip


def device_bytes(text: str) -> int:
    """`24GB`, `80 GiB`, `512MB` or a GPU name from `GPUS`, as bytes."""
    key = text.strip().upper().replace(" ", "").replace("_", "-")
    if key in GPUS:
        return GPUS[key] * 10**9
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(GIB|GB|G|MIB|MB|M|TB|TIB)", key)
    if match is None:
        raise KdistillError(
            f"--device-memory {text!r}: expected a size such as 24GB or 80GiB, or a GPU name "
            f"({', '.join(sorted(GPUS))})"
        )
    unit = {"G": 10**9, "GB": 10**9, "GIB": 2**30, "M": 10**6, "MB": 10**6, "MIB": 2**20}
    unit |= {"TB": 10**12, "TIB": 2**40}
    return int(float(match.group(1)) * unit[match.group(2)])
