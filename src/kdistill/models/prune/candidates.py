"""The shapes of one parameter budget that `kdistill prune --search` ranks (Minitron's search).

Minitron enumerates the shapes within a budget and ranks them by a short distillation each
("lightweight retraining"), because how good a shape is right after pruning predicts its quality after
training poorly. The grid here varies what trades depth against width: embedding channels, key/value
groups, and the MLP floor of the budget recipe (`shape.fit_budget`); each point is then filled to the
budget with layers and MLP width. Keys the config gives stay as given.
"""

from __future__ import annotations

import math
from typing import Any

from kdistill.config.student import FromTeacher
from kdistill.errors import KdistillError
from kdistill.models.prune.shape import (
    MLP_FLOOR,
    PrunedShape,
    budget_target,
    build_shape,
    count_params,
    fit_budget,
    hidden_unit,
    teacher_shape,
)

HIDDEN_SHARES = (1.0, 7 / 8, 3 / 4, 2 / 3)  # embedding channels kept
FLOOR_SHARES = (1 / 4, 1 / 3, 1 / 2)  # MLP width before layers go: low keeps layers, high keeps width
FILLED = 0.95  # a candidate uses at least this share of the budget


def candidate_shapes(config: Any, cfg: FromTeacher) -> list[PrunedShape]:
    """Every distinct shape of the grid within `cfg.params`, deepest first."""
    if cfg.params is None:
        raise KdistillError(
            "kdistill prune --search ranks shapes of one budget: give student.from_teacher.params"
        )
    full = teacher_shape(config)
    target = budget_target(config, cfg.params)
    heads_given = cfg.num_attention_heads is not None or cfg.num_key_value_heads is not None
    groups = [None] if heads_given else sorted({full.kv_heads, max(1, full.kv_heads - 1)}, reverse=True)
    floors = FLOOR_SHARES if cfg.intermediate_size is None else (MLP_FLOOR,)
    shapes: list[PrunedShape] = []
    for kv_heads in groups:
        per_group = full.heads // full.kv_heads
        heads = cfg.num_attention_heads or (kv_heads or cfg.num_key_value_heads) * per_group
        for hidden in [cfg.hidden_size] if cfg.hidden_size else _hidden_sizes(full.hidden, config, heads):
            fixed = {"hidden_size": hidden, "params": None}
            if kv_heads is not None:
                fixed |= {"num_key_value_heads": kv_heads, "num_attention_heads": None}
            base = build_shape(config, cfg.model_copy(update=fixed))
            for floor in floors:
                shape = _filled(config, base, target, cfg, floor)
                if shape is not None and shape not in shapes:
                    shapes.append(shape)
    if not shapes:
        raise KdistillError(
            f"student.from_teacher.params: no shape of the search grid fits {target:,} parameters with the "
            "keys given; raise params or give fewer keys"
        )
    return sorted(shapes, key=lambda s: (-s.layers, -s.hidden, -s.kv_heads))


def _hidden_sizes(hidden: int, config: Any, heads: int) -> list[int]:
    """The grid's embedding widths: multiples of 8 (of 32 for wide models), and of the heads where the
    architecture's config.json needs it (`shape.hidden_unit`), at most the teacher's."""
    unit = math.lcm(32 if hidden >= 256 else 8, hidden_unit(config, heads))
    if unit > hidden / 4:
        unit = math.lcm(8, hidden_unit(config, heads))
    sizes = {min(hidden, max(unit, round(hidden * share / unit) * unit)) for share in HIDDEN_SHARES}
    return sorted(sizes | {hidden}, reverse=True)


def _filled(
    config: Any, base: PrunedShape, target: int, cfg: FromTeacher, floor: float
) -> PrunedShape | None:
    """`base` filled to the budget, or None when it cannot reach `FILLED` of it without exceeding it."""
    try:
        shape = fit_budget(config, base, target, cfg.num_layers is None, cfg.intermediate_size is None, floor)
    except KdistillError:
        return None
    return shape if count_params(config, shape)[0] >= FILLED * target else None
