"""On-policy steps with a teacher of another tokenizer: each response the student samples is aligned
again, its sampled tokens kept as they are; `sampled` mode, which needs the teacher's log-prob of the
student's own tokens, is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cross_training import _config, sp_teacher  # noqa: F401 (the fixture)
from transformers import AutoTokenizer

from conftest import WORDS, write_config
from kdistill.cli import main
from kdistill.data.alignment import generated_view
from kdistill.data.formats import Example
from kdistill.data.tokenize import render

ON = {"lmbda": 1.0, "max_new_tokens": 12, "max_prompt_length": 48}
PROMPT = [{"role": "user", "content": "say something"}]


def _prompt_ids(tok) -> list[int]:
    """The prompt's ids as the data pipeline makes them (the tiny student has a chat template)."""
    return tok(render(Example(PROMPT, "x"), tok)[0], add_special_tokens=False)["input_ids"]


def test_same_tokenizer_aligns_every_sampled_token_one_to_one(tiny: dict) -> None:
    tok = AutoTokenizer.from_pretrained(tiny["student"])
    prompt_ids = _prompt_ids(tok)
    response = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    view = generated_view(PROMPT, prompt_ids, response, tok, tok, 512)
    # The teacher reads the same text the same way: every sampled token but the first (whose
    # predicting position is the prompt's last) pairs with itself, shifted by nothing.
    assert view.student_pos == list(range(len(prompt_ids) - 1, len(prompt_ids) + len(response) - 2))
    assert view.teacher_pos == view.student_pos and all(view.one_to_one)
    assert view.input_ids[: len(prompt_ids) + len(response) - 1] == prompt_ids + response[:-1]


def test_a_sampled_tokenization_is_kept_not_re_tokenized(tiny: dict) -> None:
    tok = AutoTokenizer.from_pretrained(tiny["student"])
    prompt_ids = _prompt_ids(tok)
    text = next(w for w in WORDS if len(w) >= 3 and len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    word = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tok.convert_tokens_to_ids(c) for c in text]  # the same text, one character a token
    assert tok.unk_token_id not in pieces and tok.decode(pieces) == text
    cat = tok("cat ", add_special_tokens=False)["input_ids"]
    view = generated_view(PROMPT, prompt_ids, cat + pieces, tok, tok, 512)
    n = len(prompt_ids) + len(cat)
    # The teacher reads the word as one token; the student's sampled pieces form one segment,
    # compared (through ULD) at the position before its first token.
    assert view.student_pos[-1] == n - 1 and not view.one_to_one[-1]
    assert view.input_ids[view.teacher_pos[-1] + 1] == word[0]


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_on_policy_steps_with_a_teacher_of_another_tokenizer(
    tiny: dict,
    sp_teacher: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    training = {"max_steps": 3, "batch_size": 4, "on_policy": ON}
    loss = {"divergence": "reverse_kl", "temperature": 1.0, "alpha": 1.0}
    config = _config(tiny, sp_teacher, tmp_path / "out", training=training, loss=loss)
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    steps = _records(tmp_path / "out")
    assert len(steps) == 3
    assert all(r["gen/rows"] == 4 and r["loss/kd"] > 0 for r in steps)

    sampled = {**training, "on_policy": {**ON, "mode": "sampled"}}
    config = _config(tiny, sp_teacher, tmp_path / "other", training=sampled, loss=loss)
    assert main(["train", str(write_config(tmp_path / "sampled.yaml", config))]) == 2
    err = capsys.readouterr().err
    assert "mode=sampled with teacher(s) of another tokenizer (teacher)" in err and "Traceback" not in err
