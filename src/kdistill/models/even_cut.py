"""A `from_teacher` student of evenly spaced teacher layers (DistilBERT's rule): the layers kept, the cut
model, and the check that a teacher can be cut so."""

from __future__ import annotations

import copy
import re
from typing import Any

from torch import nn

from kdistill.errors import KdistillError


def keep_indices(total: int, keep: int) -> list[int]:
    """`keep` layer indices evenly spaced over `total`, first and last included."""
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def shrink(teacher: nn.Module, num_layers: int) -> nn.Module:
    """A smaller model of the teacher's architecture keeping `num_layers` of its decoder layers.

    The kept layers, the embeddings, the final norm and the head are copied (DistilBERT's
    initialisation, Sanh et al. 2019). Works for any model whose decoder layers sit in one
    `nn.ModuleList` as long as `config.num_hidden_layers`.
    """
    from transformers import AutoModelForCausalLM

    if getattr(teacher.config, "quantization_config", None) is not None:
        raise KdistillError(NEEDS_UNQUANTIZED)
    prefix, kept = check_shrinkable(teacher, num_layers)
    small_config = fewer_layers(teacher.config, kept)
    student = AutoModelForCausalLM.from_config(small_config, dtype=next(teacher.parameters()).dtype)
    renumber = {old: new for new, old in enumerate(kept)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    state = {}
    for key, value in teacher.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = value.detach().clone()
        elif int(match.group(1)) in renumber:
            state[pattern.sub(f"{prefix}.{renumber[int(match.group(1))]}.", key)] = value.detach().clone()
    student.load_state_dict(state, strict=True)
    return student


NEEDS_UNQUANTIZED = "student.from_teacher needs an unquantized teacher; set teacher.quantization: none"


def check_shrinkable(teacher: nn.Module, num_layers: int) -> tuple[str, list[int]]:
    """The name of `teacher`'s list of decoder layers and the indices a `num_layers` student keeps.

    `teacher` may be a meta-device model (`meta_model`): this reads its modules, not its weights.
    """
    total = teacher.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise KdistillError(f"student.from_teacher.num_layers={num_layers}: the teacher has {total} layers")
    return _layer_list_name(teacher, total), keep_indices(total, num_layers)


def fewer_layers(config: Any, kept: list[int]) -> Any:
    small = copy.deepcopy(config)
    small.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        small.layer_types = [config.layer_types[i] for i in kept]
    return small


def _layer_list_name(model: nn.Module, total: int) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == total and name:
            return name
    raise KdistillError(
        f"student.from_teacher: cannot shrink {type(model).__name__}: "
        f"no list of {total} decoder layers found; "
        "give student.model instead"
    )
