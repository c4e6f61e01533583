"""The shapes `kdistill prune --search` ranks: every one within the budget, distinct, given keys kept."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from kdistill.config.student import FromTeacher
from kdistill.errors import KdistillError
from kdistill.models.prune.candidates import FILLED, candidate_shapes
from kdistill.models.prune.shape import budget_target, count_params, teacher_shape

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
)


def smollm2_config():
    return AutoConfig.for_model("llama", **SMOLLM2)


def test_every_candidate_fills_the_budget_and_the_grid_spans_depth_and_width() -> None:
    config = smollm2_config()
    cfg = FromTeacher(method="importance", params=63713088)
    shapes = candidate_shapes(config, cfg)
    assert len(shapes) == len(set(shapes)) >= 10
    for shape in shapes:
        assert FILLED * 63713088 <= count_params(config, shape)[0] <= 63713088
        assert shape.heads == 3 * shape.kv_heads  # whole key/value groups
    # hidden sizes that Llama's config.json accepts: multiples of the heads (9: of 72; 6: of 96)
    widths = {(576, 9), (504, 9), (432, 9), (576, 6), (480, 6), (384, 6)}
    assert {(s.hidden, s.heads) for s in shapes} >= widths
    assert all(s.hidden % s.heads == 0 for s in shapes)
    assert {s.kv_heads for s in shapes} == {3, 2}
    layers = [s.layers for s in shapes]
    assert layers == sorted(layers, reverse=True) and layers[0] == 30 and layers[-1] <= 19
    # the default budget recipe's own shape (MLP floor a third) is one of them
    assert (19, 576, 560, 9, 3) in {(s.layers, s.hidden, s.intermediate, s.heads, s.kv_heads) for s in shapes}


def test_given_keys_stay_and_a_share_is_a_share() -> None:
    config = smollm2_config()
    cfg = FromTeacher(method="importance", params=0.5, hidden_size=480, num_attention_heads=6)
    shapes = candidate_shapes(config, cfg)
    target = budget_target(config, 0.5)
    assert target == round(0.5 * count_params(config, teacher_shape(config))[0])
    assert shapes and all((s.hidden, s.heads, s.kv_heads) == (480, 6, 2) for s in shapes)
    assert len({s.intermediate for s in shapes}) == len(shapes)  # only the MLP floor varies


def test_a_hidden_size_llama_cannot_load_is_refused_with_the_nearest_ones() -> None:
    cfg = FromTeacher(method="importance", params=0.5, hidden_size=512)
    with pytest.raises(KdistillError, match="hidden_size=512 with 9 attention heads.*give 504 or 513"):
        candidate_shapes(smollm2_config(), cfg)


def test_search_needs_a_budget() -> None:
    with pytest.raises(KdistillError, match="give student.from_teacher.params"):
        candidate_shapes(smollm2_config(), FromTeacher(method="importance", num_layers=10))
