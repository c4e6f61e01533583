"""The engine's weights file: written once, then rewritten in place at each sync with the same bytes a
fresh safetensors file would hold."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kdistill.sampling.engine_weights import WEIGHTS, write_weights


def test_a_sync_rewrites_the_file_in_place_with_the_new_weights(tiny: dict, tmp_path: Path) -> None:
    student = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float32)
    student.config.tie_word_embeddings = True
    student.tie_weights()
    write_weights(student, tmp_path)
    path = tmp_path / WEIGHTS
    inode = path.stat().st_ino
    with torch.no_grad():  # what an optimizer step does
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    write_weights(student, tmp_path)
    assert path.stat().st_ino == inode  # the same file, its bytes replaced
    written, expected = load_file(path), student.state_dict()
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    assert torch.equal(written["lm_head.weight"], written["model.embed_tokens.weight"])  # the tied head


def test_other_tensors_get_a_new_file(tiny: dict, tmp_path: Path) -> None:
    student = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float32)
    write_weights(student, tmp_path)
    inode = (tmp_path / WEIGHTS).stat().st_ino
    wider = student.resize_token_embeddings(student.config.vocab_size + 8)
    write_weights(student, tmp_path)
    assert (tmp_path / WEIGHTS).stat().st_ino != inode
    assert load_file(tmp_path / WEIGHTS)["model.embed_tokens.weight"].shape == wider.weight.shape
    assert not list(tmp_path.glob(".*.part"))
