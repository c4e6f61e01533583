"""The shape of a pruned student, from the teacher's config.json and the config alone (no weights).

A shape is the five numbers Minitron prunes: decoder layers, embedding channels, MLP neurons, query
heads and key/value groups. `student_config` turns it into an ordinary config of the teacher's
architecture; `count_params` counts that model's parameters on the meta device, so `validate` and the
memory pre-flight know a pruned student's size without loading a weight.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from kdistill.config.student import FromTeacher
from kdistill.errors import KdistillError

# Decoder-only families whose parameters `models.prune.surgery` knows how to slice, by config.model_type.
SUPPORTED = {
    "llama": "Llama / SmolLM2",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma3_text": "Gemma 3 (Gemma3ForCausalLM)",
}

# The budget recipe's MLP floor: MLP width is cut to this share of the teacher's before any layer goes.
MLP_FLOOR = 1 / 3
MLP_STEP = 8  # MLP widths chosen for a budget are multiples of this


@dataclass(frozen=True)
class PrunedShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int

    def describe(self) -> str:
        return (
            f"{self.layers} layers, hidden {self.hidden}, MLP {self.intermediate}, "
            f"{self.heads} heads / {self.kv_heads} key-value groups"
        )

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def check_supported(config: Any) -> None:
    """One clear error for an architecture that width pruning cannot slice."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise KdistillError(
            f"student.from_teacher.method: importance supports {', '.join(SUPPORTED.values())}; the "
            f"teacher is {kind!r} ({', '.join(getattr(config, 'architectures', None) or [])}). "
            "Use method: even, or give student.model"
        )


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def teacher_shape(config: Any) -> PrunedShape:
    return PrunedShape(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=config.num_attention_heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )


def student_config(config: Any, shape: PrunedShape, kept_layers: list[int] | None = None) -> Any:
    """The teacher's config with the student's shape; `kept_layers` picks per-layer settings (Gemma 3)."""
    small = copy.deepcopy(config)
    kept = kept_layers if kept_layers is not None else list(range(shape.layers))
    small.num_hidden_layers = shape.layers
    if isinstance(getattr(config, "layer_types", None), list):
        small.layer_types = [config.layer_types[i] for i in kept]
    # head_dim stays the teacher's: Llama-style configs would otherwise derive it from hidden / heads.
    small.head_dim = head_dim(config)
    small.hidden_size = shape.hidden
    small.intermediate_size = shape.intermediate
    small.num_attention_heads = shape.heads
    small.num_key_value_heads = shape.kv_heads
    return small


def count_params(config: Any, shape: PrunedShape) -> tuple[int, int]:
    """`(total, non-embedding)` parameters of `shape` of `config`'s architecture, from a meta-device model.

    Non-embedding leaves out the input embedding and an untied output head.
    """
    key = (config.to_json_string(), shape)
    if key not in _COUNTS:
        _COUNTS[key] = _count(config, shape)
    return _COUNTS[key]


_COUNTS: dict[tuple[str, PrunedShape], tuple[int, int]] = {}  # the budget search counts the same shapes again


def _count(config: Any, shape: PrunedShape) -> tuple[int, int]:
    from transformers import AutoModelForCausalLM

    small = student_config(config, shape)
    small.quantization_config = None  # a GGUF or bitsandbytes teacher's: the student is plain
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(small)
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    outside = embedding.numel() + (0 if head is embedding else head.numel())
    return total, total - outside


def build_shape(config: Any, cfg: FromTeacher) -> PrunedShape:
    """The shape of a `method: importance` student, checked against the teacher's config."""
    check_supported(config)
    full = teacher_shape(config)
    shape = replace(
        full,
        layers=check_range("num_layers", cfg.num_layers or full.layers, full.layers),
        hidden=check_range("hidden_size", cfg.hidden_size or full.hidden, full.hidden),
        intermediate=check_range(
            "intermediate_size", cfg.intermediate_size or full.intermediate, full.intermediate
        ),
        **_heads(full, cfg.num_attention_heads, cfg.num_key_value_heads),
    )
    check_loadable(config, shape)
    if cfg.params is None:
        return shape
    target = budget_target(config, cfg.params)
    return fit_budget(config, shape, target, cfg.num_layers is None, cfg.intermediate_size is None)


# Families whose config.json transformers refuses to load unless hidden_size is a multiple of
# num_attention_heads (their `validate_architecture`), although head_dim is given.
HEADS_DIVIDE_HIDDEN = {"llama", "gemma3_text"}


def hidden_unit(config: Any, heads: int) -> int:
    """What a pruned hidden size must be a multiple of for a loadable config.json (1: anything)."""
    return heads if getattr(config, "model_type", None) in HEADS_DIVIDE_HIDDEN else 1


def check_loadable(config: Any, shape: PrunedShape) -> None:
    unit = hidden_unit(config, shape.heads)
    if shape.hidden % unit:
        lower, upper = shape.hidden // unit * unit, -(-shape.hidden // unit) * unit
        raise KdistillError(
            f"student.from_teacher.hidden_size={shape.hidden} with {shape.heads} attention heads: "
            f"transformers loads a {SUPPORTED[config.model_type]} config.json only when hidden_size is a "
            f"multiple of num_attention_heads; give {lower or unit} or {upper}, or other heads"
        )


def check_range(key: str, value: int, most: int) -> int:
    if not 1 <= value <= most:
        raise KdistillError(f"student.from_teacher.{key}={value}: the teacher has {most}; give 1 to {most}")
    return value


def _heads(full: PrunedShape, heads: int | None, kv_heads: int | None) -> dict[str, int]:
    """Query heads and key/value groups kept: whole groups, each with all of its query heads."""
    group = full.heads // full.kv_heads
    if kv_heads is None and heads is None:
        return {"heads": full.heads, "kv_heads": full.kv_heads}
    if kv_heads is None:
        if heads % group:
            raise KdistillError(
                f"student.from_teacher.num_attention_heads={heads}: whole key/value groups are pruned, "
                f"each of {group} query heads; give a multiple of {group} (at most {full.heads})"
            )
        kv_heads = heads // group
    check_range("num_key_value_heads", kv_heads, full.kv_heads)
    if heads is not None and heads != kv_heads * group:
        raise KdistillError(
            f"student.from_teacher.num_attention_heads={heads} with num_key_value_heads={kv_heads}: whole "
            f"key/value groups are pruned, each of {group} query heads, so num_attention_heads must be "
            f"{kv_heads * group}"
        )
    return {"heads": kv_heads * group, "kv_heads": kv_heads}


def budget_target(config: Any, params: float) -> int:
    """`params` as a count: a share (<= 1) of the teacher's parameters, or a count as given."""
    return round(params * count_params(config, teacher_shape(config))[0]) if params <= 1 else int(params)


def fit_budget(
    config: Any,
    shape: PrunedShape,
    target: int,
    free_layers: bool,
    free_mlp: bool,
    floor_share: float = MLP_FLOOR,
) -> PrunedShape:
    """The largest shape within `target` parameters, changing only the layers and MLP width left free.

    The recipe: MLP width down to `floor_share` of the teacher's, then layers off until the budget is
    met, then MLP width back up (in steps of `MLP_STEP`) as far as the budget allows. Parameters are
    affine in the layers and in the MLP width, so four counts give the closed form; the result is
    counted again.
    """

    def total(layers: int, mlp: int) -> int:
        return count_params(config, replace(shape, layers=layers, intermediate=mlp))[0]

    floor = shape.intermediate
    if free_mlp:
        floor = min(shape.intermediate, _multiple(shape.intermediate * floor_share))
    fixed, per_layer = _affine(lambda n: total(n, floor))
    layers = max(1, min(shape.layers, (target - fixed) // per_layer)) if free_layers else shape.layers
    mlp = floor
    if free_mlp:
        fixed, per_step = _affine(lambda n: total(layers, n * MLP_STEP))
        mlp = max(MLP_STEP, min(shape.intermediate, (target - fixed) // per_step * MLP_STEP))
    result = replace(shape, layers=layers, intermediate=mlp)
    if total(layers, mlp) > target:
        raise KdistillError(
            f"student.from_teacher.params: no shape within {target:,} parameters keeps the given keys "
            f"({result.describe()} has {total(layers, mlp):,}); raise params or give smaller widths"
        )
    return result


def _multiple(width: float) -> int:
    return max(MLP_STEP, round(width / MLP_STEP) * MLP_STEP)


def _affine(count: Any) -> tuple[int, int]:
    """`(fixed, per unit)` of a parameter count affine in one integer."""
    one, two = count(1), count(2)
    return one - (two - one), two - one
