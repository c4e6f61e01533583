"""FLOP counting (train/flops.py) against a hand count, and `flops_per_s` in a run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.prerun.flops import (
    ModelShape,
    attention_pairs,
    matmul_peak,
    model_shape,
    step_flops,
    student_flops,
    teacher_flops,
)


def _llama(layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def test_model_shape_counts_linear_weights_by_hand() -> None:
    # Per layer: q 8x8, k 8x4, v 8x4 (one KV head of size 4), o 8x8, gate/up/down 8x16 each.
    per_layer = 64 + 32 + 32 + 64 + 3 * 128
    body = 2 * per_layer
    expected = ModelShape(body, body, head=80, head_trained=True, layers=2, attention_width=8)
    assert model_shape(_llama()) == expected


def test_frozen_weights_do_not_count_as_trained() -> None:
    model = _llama()
    model.requires_grad_(False)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    shape = model_shape(model)
    assert shape.trained_body == 128 and shape.body == 1152 and not shape.head_trained


def test_attention_pairs_follow_the_causal_mask() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # rows of 3 and 4 tokens: 6 + 10 pairs
    assert attention_pairs(mask) == 16


def test_step_flops_by_hand() -> None:
    student = ModelShape(body=100, trained_body=100, head=50, head_trained=True, layers=2, attention_width=4)
    teacher = ModelShape(body=300, trained_body=0, head=50, head_trained=False, layers=3, attention_width=8)
    tokens, trained, pairs = 7, 3, 16
    # Student: 6N per token, head 6VH per trained token, attention 3 x 4 x L x d per pair.
    own = 7 * 600 + 3 * 300 + 3 * 4 * 2 * 4 * 16
    # Teacher: 2N per token, head 2VH per trained token, attention 4 x L x d per pair.
    theirs = 7 * 600 + 3 * 100 + 4 * 3 * 8 * 16
    assert student_flops(student, tokens, trained, pairs) == own == 6636
    assert teacher_flops(teacher, tokens, trained, pairs) == theirs == 6036
    assert step_flops(student, [teacher], tokens, trained, pairs) == own + theirs
    assert step_flops(student, [], tokens, trained, pairs) == own  # a cached teacher costs nothing


def test_lora_student_pays_backward_through_the_frozen_body() -> None:
    lora = ModelShape(body=1000, trained_body=10, head=50, head_trained=False, layers=1, attention_width=4)
    # 4N (forward + input gradients) + 2 x trained; the frozen head: forward + input gradient only.
    assert student_flops(lora, tokens=1, trained=1, pairs=0) == 4 * 1000 + 2 * 10 + 4 * 50


def test_matmul_peak_is_a_plausible_rate() -> None:
    peak = matmul_peak(sizes=(128,), repeats=2)
    assert 1e7 < peak < 1e15  # FLOP/s: above a slow interpreter loop, below any CPU or GPU today


def test_training_logs_flops_per_second(tmp_path: Path, tiny: dict) -> None:
    config = tiny_config(tiny, tmp_path / "out", training={"max_steps": 2, "logging_steps": 1})
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if "loss" in r]
    assert len(steps) == 2
    # The tiny pair (conftest): hidden 64, MLP 128, one 64 x 32 K and V; 36,864 linear weights a layer.
    # Per token: 6N for the 2-layer student's body, 2N for the 4-layer teacher's: 20 layers' worth.
    body = 20 * 36_864
    # At most: both heads (8 x VH, V about 320) at every token, and attention at <= 32.5 pairs a token
    # (rows of <= 64 tokens) at 3 x 4 x 2 x 64 (student) + 4 x 4 x 64 (teacher) FLOPs a pair.
    most = body + 8 * 320 * 64 + 32.5 * (1536 + 1024)
    for record in steps:
        per_token = record["flops_per_s"] / record["tokens_per_s"]
        assert body < per_token < most


def test_fused_adamw_keeps_the_losses() -> None:
    # The loop's fused AdamW (a speed-up of issue #7) must train exactly as the plain one does.
    from kdistill.run.optimizer import adamw as _adamw
    from kdistill.run.optimizer import param_groups as _param_groups

    torch.manual_seed(0)
    batch = torch.randint(0, 10, (2, 6))
    losses = {}
    for fused in (True, False):
        torch.manual_seed(1)
        model = _llama()
        groups = _param_groups(model, 0.01)
        optimizer = _adamw(groups, 1e-2) if fused else torch.optim.AdamW(groups, lr=1e-2, foreach=False)
        assert optimizer.defaults["fused"] is (True if fused else None)
        losses[fused] = []
        for _ in range(5):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[fused].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True][-1] < losses[True][0]  # it trained
