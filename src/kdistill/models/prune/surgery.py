"""Cut a teacher to a pruned shape: which units to keep, and the smaller model that keeps them.

The student is an ordinary model of the teacher's architecture built from a smaller config.json
(`shape.student_config`); each of its weights is the teacher's, with the pruned rows and columns left
out. transformers has no structured pruning of this kind (its `prune_heads` is for encoders), so the
slicing is written here, one rule per kind of weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill.errors import KdistillError
from kdistill.models.prune.importance import Importance, decoder_layers
from kdistill.models.prune.shape import PrunedShape, head_dim, student_config, teacher_shape


@dataclass
class Kept:
    """Indices of the teacher's units a student keeps, in the teacher's order."""

    layers: list[int]
    neurons: list[torch.Tensor]  # per kept layer
    groups: list[torch.Tensor]  # key/value groups, per kept layer
    channels: torch.Tensor

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "mlp_neurons": [n.tolist() for n in self.neurons],
            "key_value_groups": [g.tolist() for g in self.groups],
            "embedding_channels": self.channels.tolist(),
        }


def top(scores: torch.Tensor | list[float], k: int) -> torch.Tensor:
    """The indices of the `k` highest scores, ascending (ties go to the lower index)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    order = torch.sort(-scores, stable=True).indices
    return order[:k].sort().values


def choose(importance: Importance, layers: list[int], shape: PrunedShape, teacher: PrunedShape) -> Kept:
    """Keep `layers` (ascending), and in each the most important neurons and groups.

    A key/value group's score is the sum of its query heads' scores: query head h reads group
    h // (heads / groups), as transformers' `repeat_kv` lays them out.
    """
    per_group = teacher.heads // teacher.kv_heads
    groups = [importance.heads[i].view(teacher.kv_heads, per_group).sum(-1) for i in layers]
    return Kept(
        layers=layers,
        neurons=[top(importance.neurons[i], shape.intermediate) for i in layers],
        groups=[top(g, shape.kv_heads) for g in groups],
        channels=top(importance.channels, shape.hidden),
    )


def even_kept(teacher: PrunedShape, layers: list[int]) -> Kept:
    """`layers`, with every unit of each kept."""
    every = torch.arange
    return Kept(
        layers=layers,
        neurons=[every(teacher.intermediate) for _ in layers],
        groups=[every(teacher.kv_heads) for _ in layers],
        channels=every(teacher.hidden),
    )


def prune(teacher: nn.Module, shape: PrunedShape, kept: Kept) -> nn.Module:
    """The student of `shape` holding the teacher's weights of the `kept` units."""
    from transformers import AutoModelForCausalLM

    config = student_config(teacher.config, shape, kept.layers)
    student = AutoModelForCausalLM.from_config(config, dtype=next(teacher.parameters()).dtype)
    source = teacher.state_dict()
    size = head_dim(teacher.config)
    per_group = teacher_shape(teacher.config).heads // teacher_shape(teacher.config).kv_heads
    layer_key = re.compile(r"^(.*\.layers)\.(\d+)\.(.*)$")
    state = {}
    for key, target in student.state_dict().items():
        match = layer_key.match(key)
        if match is None:
            indices = {"hidden": kept.channels}
            teacher_key = key
        else:
            new = int(match.group(2))
            teacher_key = f"{match.group(1)}.{kept.layers[new]}.{match.group(3)}"
            groups = kept.groups[new]
            heads = (groups[:, None] * per_group + torch.arange(per_group)).flatten()
            indices = {
                "hidden": kept.channels,
                "q": _rows(heads, size),
                "kv": _rows(groups, size),
                "mlp": kept.neurons[new],
            }
        state[key] = _slice(key, source[teacher_key], indices, target.shape)
    _keep_embedding_scale(teacher.config, shape, state)
    student.load_state_dict(state, strict=True)
    return student


# The ridge of `refit_mlp`, as a share of the kept activations' mean energy: it steadies the solve where
# kept neurons are nearly collinear. On SmolLM2's quickstart, 1e-4 gave the lowest KL of 1e-5 .. 1e-2.
REFIT_RIDGE = 1e-4


@torch.no_grad()
def refit_mlp(student: nn.Module, teacher: nn.Module, kept: Kept, grams: list[torch.Tensor]) -> None:
    """Refit each pruned layer's MLP down projection so that its kept neurons reproduce the full MLP.

    With `A` a teacher layer's MLP activations on the calibration tokens, `G = AᵀA` its Gram matrix
    (`grams`), `W` its down projection and `K` the kept neurons, the student's `W'` minimises
    `|A Wᵀ - A_K W'ᵀ|² + r |W'|²`: `W' = W G[:, K] (G[K, K] + r I)⁻¹`, solved in float64, the rows of the
    kept embedding channels taken. A layer that keeps every neuron keeps its weights.
    """
    for new, (layer, neurons) in enumerate(zip(kept.layers, kept.neurons, strict=True)):
        gram = grams[layer].double()
        if len(neurons) == gram.shape[0]:
            continue
        target = decoder_layers(student)[new].mlp.down_proj.weight
        full = decoder_layers(teacher)[layer].mlp.down_proj.weight.double().cpu()[kept.channels]
        inner = gram[neurons][:, neurons]
        ridge = REFIT_RIDGE * inner.diagonal().mean() * torch.eye(len(neurons), dtype=torch.float64)
        solved = torch.linalg.solve(inner + ridge, (full @ gram[:, neurons]).T).T
        target.copy_(solved.to(device=target.device, dtype=target.dtype))


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """The rows of a projection's output that belong to `units` heads of `size` each."""
    return (units[:, None] * size + torch.arange(size)).flatten()


# Per kind of weight: the index kind of each of its dimensions (None: kept whole).
_RULES = {
    "embed_tokens.weight": (None, "hidden"),
    "lm_head.weight": (None, "hidden"),
    "q_proj.weight": ("q", "hidden"),
    "q_proj.bias": ("q",),
    "k_proj.weight": ("kv", "hidden"),
    "k_proj.bias": ("kv",),
    "v_proj.weight": ("kv", "hidden"),
    "v_proj.bias": ("kv",),
    "o_proj.weight": ("hidden", "q"),
    "o_proj.bias": ("hidden",),
    "gate_proj.weight": ("mlp", "hidden"),
    "up_proj.weight": ("mlp", "hidden"),
    "down_proj.weight": ("hidden", "mlp"),
    "q_norm.weight": (None,),  # per head_dim, which pruning never changes
    "k_norm.weight": (None,),
}


def _slice(key: str, value: torch.Tensor, indices: dict[str, torch.Tensor], want: torch.Size) -> torch.Tensor:
    rule = next((dims for suffix, dims in _RULES.items() if key.endswith(suffix)), None)
    if rule is None and key.endswith("norm.weight") and value.dim() == 1:
        rule = ("hidden",)  # every other norm is over the hidden channels
    if rule is None:
        rule = (None,) * value.dim()
    out = value.detach()
    for dim, kind in enumerate(rule):
        if kind is not None:
            out = out.index_select(dim, indices[kind].to(out.device))
    if out.shape != want:
        raise KdistillError(
            f"student.from_teacher: cannot prune the teacher's {key} {tuple(value.shape)} to {tuple(want)}; "
            "this architecture's weights are laid out in a way kdistill does not know"
        )
    return out.clone()


def _keep_embedding_scale(config: Any, shape: PrunedShape, state: dict[str, torch.Tensor]) -> None:
    """Gemma 3 multiplies its embeddings by sqrt(hidden_size): keep the teacher's scale in the student.

    The student's own factor is sqrt(H'), so its kept embedding rows are multiplied by c = sqrt(H / H')
    and the residual stream starts where the teacher's does. A tied head reads the same, now c times
    larger, matrix; the final norm is RMSNorm, whose output is x_hat * (1 + w), so (1 + w) / c there
    gives the same logits. The other norms see an input of the teacher's scale and need nothing.
    """
    if config.model_type != "gemma3_text" or shape.hidden == config.hidden_size:
        return
    c = math.sqrt(config.hidden_size / shape.hidden)
    tied = getattr(config, "tie_word_embeddings", False)
    for key in list(state):
        if key.endswith("embed_tokens.weight") or (tied and key == "lm_head.weight"):
            state[key] = state[key] * c
        elif tied and key.endswith("model.norm.weight"):
            state[key] = (1 + state[key]) / c - 1
