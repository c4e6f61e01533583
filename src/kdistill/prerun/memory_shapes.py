"""What the memory estimate reads: a model's shape (from its config.json or kdistill's table of known
models), the widest batch of the run's data, and a device's memory (a size such as `24GB` or a GPU
name)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from kdistill.config import RunConfig
from kdistill.data import Collator
from kdistill.errors import KdistillError
from kdistill.models.parts import text_config

# Architectures whose MLP is two matrices (up, down) rather than the gated three (gate, up, down).
_PLAIN_MLP = {"phi", "gpt2", "gpt_neox", "gptj", "opt", "falcon", "starcoder2", "bloom"}
# Architectures whose attention and MLP both read one norm's output (else each has its pre-norm).
_ONE_NORM = {"phi", "gptj"}
# Activations written out in Python (x * 0.5 * (1 + tanh(...))): autograd keeps three more
# intermediate-sized tensors than for a native activation.
_WRITTEN_OUT = {"gelu_new", "gelu_fast", "gelu_pytorch_tanh_python"}


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
    parallel: bool = False  # one norm per layer (`_ONE_NORM`)
    activation: str = "silu"

    def layer_params(self) -> int:
        """Weights of one decoder layer (attention and MLP; norms and biases are negligible)."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attention + (3 if self.gated else 2) * self.hidden * self.intermediate

    def embedding_params(self) -> int:
        """The input embedding and, when untied, the output head."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def params(self, layers: int | None = None) -> int:
        return (self.layers if layers is None else layers) * self.layer_params() + self.embedding_params()

    def mlp_saved(self) -> int:
        """(tokens, intermediate) tensors the MLP keeps for backward: a gated one its two projections,
        the activation and their product; an ungated one the projection and the activation, plus three
        for an activation written out in Python."""
        if self.gated:
            return 4
        return 5 if self.activation in _WRITTEN_OUT else 2

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
    kind = str(getattr(c, "model_type", ""))
    act = getattr(c, "hidden_act", None) or getattr(c, "hidden_activation", None)
    return Shape(
        layers=int(c.num_hidden_layers),
        hidden=hidden,
        intermediate=int(c.intermediate_size),
        heads=heads,
        kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(c, "head_dim", None) or hidden // heads),
        vocab=int(c.vocab_size),
        tied=bool(getattr(c, "tie_word_embeddings", False)),
        gated=kind not in _PLAIN_MLP,
        parallel=kind in _ONE_NORM,
        activation=str(act or getattr(c, "activation_function", None) or "silu"),
    )


class _Dict:
    def __init__(self, values: dict) -> None:
        self.__dict__.update(values)


class Widest(NamedTuple):
    """The widest batch a run trains on: tokens per row (padded), the longest prompt among its rows
    (tokens before the first trained one), and the most tokens that train in one batch."""

    width: int
    prompt: int
    trained: int


def padded(tokens: int) -> int:
    """`tokens` rounded up as the collator pads a batch."""
    step = Collator.pad_to_multiple_of  # the collator pads each batch to a multiple of this
    return -(-tokens // step) * step


def widest_batch(cfg: RunConfig, processes: int = 1) -> Widest | None:
    """The widest batch among those the run trains on, in the run's own batch order (`run.batches`):
    a run shorter than an epoch sees only its first batches, a longer one every row. None when the
    tokenizer or the data cannot be read here (the estimate then assumes data.max_length)."""
    from kdistill.data import IGNORE_INDEX, build_datasets
    from kdistill.data.batches import length_grouped_batches
    from kdistill.teacher.vocabularies import load_vocabularies

    try:
        vocabs = load_vocabularies(cfg)
        data = build_datasets(
            cfg.data.model_copy(update={"responses": "dataset"}), vocabs.tokenizer, cfg.training.seed, None,
            vocabs.cross,
        )  # fmt: skip
    except (KdistillError, OSError):
        return None
    train, t = data.train, cfg.training
    if not train:
        return None
    batches = length_grouped_batches([len(row.input_ids) for row in train], t.batch_size, t.seed * 1000)
    windows = math.ceil(len(train) / (t.batch_size * processes * t.gradient_accumulation_steps))
    steps = t.max_steps or math.ceil(t.num_epochs * windows)
    seen = [
        [train[i] for i in batch] for batch in batches[: steps * t.gradient_accumulation_steps * processes]
    ]
    trained = [sum(x != IGNORE_INDEX for row in b for x in row.labels) for b in seen]
    prompts = [next((k for k, x in enumerate(row.labels) if x != IGNORE_INDEX), 1) for b in seen for row in b]
    return Widest(padded(max(len(row.input_ids) for b in seen for row in b)), max(prompts), max(trained))


# config.json's numbers of well-known hub models, so the estimate works offline (as KNOWN_VOCABULARIES
# does for their tokenizers).
KNOWN_ARCHITECTURES: dict[str, dict] = {
    "mistralai/Mistral-7B-v0.1": dict(
        model_type="mistral", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
        hidden_act="silu",
    ),
    "mistralai/Mistral-7B-Instruct-v0.2": dict(
        model_type="mistral", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
        hidden_act="silu",
    ),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
        hidden_act="silu",
    ),
    "microsoft/phi-2": dict(
        model_type="phi", num_hidden_layers=32, hidden_size=2560, intermediate_size=10240,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=51200, tie_word_embeddings=False,
        hidden_act="gelu_new",
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
