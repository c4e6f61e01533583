"""Compact teacher weights (models/compact.py): bit-identical numbers in less memory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.models.compact import CompactLinear, compact_frozen, expand_q4, expanded_weights, q4_parts
from kdistill.prerun.flops import model_shape


def q4_weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """An fp32 weight as a GGUF Q4_1 conversion makes it: fp16 scale and offset per 32 weights."""
    g = torch.Generator().manual_seed(seed)
    blocks = out * inp // 32
    scale = (torch.rand(blocks, 1, generator=g) * 0.02).half().float()
    offset = (-torch.rand(blocks, 1, generator=g) * 0.1).half().float()
    codes = torch.randint(0, 16, (blocks, 32), generator=g).float()
    codes[:, 0], codes[:, 1] = 0, 15  # each block spans its range, as the quantizer makes it
    return (codes * scale + offset).reshape(out, inp)


def quantize_like_gguf(model: nn.Module) -> None:
    """Round every linear weight but the head to the Q4_1 form (what a GGUF teacher's fp32 holds)."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not head:
                blocks = module.weight.reshape(-1, 32)
                low = blocks.amin(1, keepdim=True).half().float()
                scale = ((blocks.amax(1, keepdim=True) - low) / 15).half().float()
                codes = torch.round((blocks - low) / scale).clamp(0, 15)
                module.weight.copy_((codes * scale + low).reshape(module.weight.shape))


def test_q4_form_expands_to_the_same_bits() -> None:
    weight = q4_weight(48, 64)
    parts = q4_parts(weight)
    assert parts is not None
    assert parts["codes"].dtype == torch.uint8 and parts["codes"].shape == (48 * 2, 16)
    assert torch.equal(expand_q4(parts["codes"], parts["scale"], parts["offset"], (48, 64)), weight)
    size = sum(t.numel() * t.element_size() for t in parts.values())
    assert size * 8 == weight.numel() * 5  # 5 bits a weight (4-bit code, fp16 scale and offset per 32)


def test_ordinary_weights_have_no_q4_form() -> None:
    assert q4_parts(torch.randn(48, 64)) is None
    assert q4_parts(q4_weight(8, 32)[:, :31].contiguous()) is None  # not whole blocks
    off_by_one_ulp = q4_weight(48, 64)
    off_by_one_ulp[5, 7] = torch.nextafter(off_by_one_ulp[5, 7], torch.tensor(1.0))
    assert q4_parts(off_by_one_ulp) is None


def test_compact_layers_compute_exactly_what_the_originals_did() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 48), nn.Linear(48, 32, bias=False), nn.Linear(32, 32), nn.Linear(32, 8)
    )
    with torch.no_grad():
        model[0].weight.copy_(q4_weight(48, 64, seed=1))
        model[1].weight.copy_(torch.randn(32, 48).bfloat16().float())
        # model[2]: ordinary fp32, stays; model[3] trains, so it is never touched
        model[3].weight.copy_(q4_weight(8, 32, seed=2))
    model.requires_grad_(False)
    model[3].requires_grad_(True)
    x = torch.randn(5, 64)
    before = model(x)
    report = compact_frozen(model)
    assert (report.q4_blocks, report.bf16, report.left) == (1, 1, 1)
    assert isinstance(model[0], CompactLinear) and model[0].form == "q4_blocks"
    assert isinstance(model[1], CompactLinear) and model[1].form == "bf16"
    assert type(model[2]) is nn.Linear and type(model[3]) is nn.Linear
    assert torch.equal(model(x), before)
    assert report.bytes_before == (48 * 64 + 32 * 48) * 4 and report.bytes_after < report.bytes_before / 2


def test_inference_mode_and_no_grad_passes_can_alternate() -> None:
    # Training runs the teacher under inference mode, evaluation and the cache under no_grad: the
    # shared expansion buffers must serve both, in any order.
    model = nn.Sequential(nn.Linear(64, 48)).requires_grad_(False)
    with torch.no_grad():
        model[0].weight.copy_(q4_weight(48, 64, seed=3))
    x = torch.randn(3, 64)
    expected = model(x)
    compact_frozen(model)
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode, torch.enable_grad):
        with mode():
            assert torch.equal(model(x), expected)


def test_a_gguf_like_teacher_gives_the_same_logits_and_flops(tiny: dict) -> None:
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"], dtype=torch.float32).requires_grad_(False)
    quantize_like_gguf(teacher)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 24))
    with torch.no_grad():
        before = teacher(input_ids=ids).logits
    shape = model_shape(teacher)
    report = compact_frozen(teacher)
    assert report.q4_blocks == 4 * 7 and report.left == 0  # q, k, v, o, gate, up, down in 4 layers
    assert teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight  # still tied
    with torch.no_grad():
        assert torch.equal(teacher(input_ids=ids).logits, before)
    assert model_shape(teacher) == shape  # FLOPs counted as before


def test_generation_expands_once_and_writes_the_same_text(tiny: dict, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.teacher.responses import generate

    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"], dtype=torch.float32).requires_grad_(False)
    quantize_like_gguf(teacher)
    prompts = [[{"role": "user", "content": text}] for text in ("Name a colour.", "Why is the sky blue?")]
    expected = generate(teacher, tokenizer, prompts, 12, batch_size=2)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits
    compact_frozen(teacher)
    expansions = []
    original = CompactLinear.expand
    counted = lambda self, out=None: expansions.append(1) or original(self, out)  # noqa: E731
    monkeypatch.setattr(CompactLinear, "expand", counted)
    assert generate(teacher, tokenizer, prompts, 12, batch_size=2, label="compact teacher") == expected
    assert len(expansions) == 4 * 7  # each layer once for the whole batch of 12 tokens, not once a token
    with torch.inference_mode(), expanded_weights(teacher):
        assert torch.equal(teacher(input_ids=ids).logits, logits)
    assert all(m.held is None for m in teacher.modules() if isinstance(m, CompactLinear))  # freed on exit


def _gguf_like_teacher(tiny: dict, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"], dtype=torch.float32)
    quantize_like_gguf(teacher)
    teacher.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny["teacher"]).save_pretrained(folder)
    return folder


def test_training_losses_are_the_same_with_a_compact_teacher(
    tmp_path: Path, tiny: dict, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kdistill")
    teacher = _gguf_like_teacher(tiny, tmp_path / "teacher")
    losses = {}
    for compact in (False, True):
        out = tmp_path / f"compact-{compact}"
        config = tiny_config(tiny, out, training={"max_steps": 3})
        config["teacher"] = {"model": str(teacher), "compact": compact}
        assert main(["train", str(write_config(tmp_path / f"{compact}.yaml", config))]) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[compact] = [(r["loss"], r["loss/kd"]) for r in records if "loss" in r] + [
            r["eval/kl"] for r in records if "eval/kl" in r
        ]
    assert len(losses[True]) == 3 + 2 and losses[True] == losses[False]  # bit for bit
    assert any("28 linear weights stored as 4-bit blocks" in m for m in caplog.messages)
