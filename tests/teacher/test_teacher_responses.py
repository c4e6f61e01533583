"""Teacher-written responses survive an interruption: what was generated is kept, the rest generated next."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import kdistill.teacher.responses as responses
from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.data.formats import Example
from kdistill.errors import ResumableInterrupt
from kdistill.teacher.responses import with_teacher_responses

WORDS = ("sun", "moon", "river", "city", "book", "music", "apple")


def _examples() -> list[Example]:
    # Prompts of different lengths, so that the length-sorted batches differ from the given order.
    return [
        Example([{"role": "user", "content": f"name the {w} " + "and " * i}], "old")
        for i, w in enumerate(WORDS)
    ]


def _counting_generate(model, fail_after: int | None = None) -> list[int]:
    """Count the rows of each `model.generate` call; Ctrl-C (KeyboardInterrupt) on call `fail_after + 1`."""
    real, rows = type(model).generate.__get__(model), []  # the model's own, not an earlier wrapper

    def generate(*args, **kwargs):
        if fail_after is not None and len(rows) == fail_after:
            raise KeyboardInterrupt
        rows.append(len(kwargs["input_ids"]))
        return real(*args, **kwargs)

    model.generate = generate
    return rows


def test_interrupted_responses_are_kept_and_only_the_rest_generated(
    tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny["teacher"])
    examples, settings = _examples(), {"teacher_id": "tiny", "max_new_tokens": 6, "batch_size": 2}
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "straight"))
    straight = with_teacher_responses(
        examples, AutoModelForCausalLM.from_pretrained(tiny["teacher"]), tok, **settings
    )

    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "stopped"))
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    rows = _counting_generate(teacher, fail_after=2)
    with pytest.raises(
        ResumableInterrupt, match="teacher responses: interrupted after 4 of 7; they are kept in .*partial"
    ):
        with_teacher_responses(examples, teacher, tok, **settings)
    assert rows == [2, 2]
    folder = tmp_path / "stopped" / "responses"
    [partial] = folder.glob("*.partial.jsonl")
    assert len(responses.read_partial(partial, len(examples))) == 4
    with partial.open("a") as handle:
        handle.write('[[6, "cut by a cr')  # a crash in the middle of a write

    rows = _counting_generate(teacher)
    again = with_teacher_responses(examples, teacher, tok, **settings)
    assert rows == [2, 1]  # the 3 prompts that were left
    assert again == straight
    assert not partial.exists() and [p.name for p in folder.iterdir()] == [
        partial.name.split(".")[0] + ".json"
    ]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_teacher_writes_responses_says_how_to_resume(
    tmp_path: Path,
    tiny: dict,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    stop: signal.Signals,
    request: pytest.FixtureRequest,
) -> None:
    caplog.set_level(logging.INFO, logger="kdistill")
    # Ctrl-C's own handler, whatever handler an earlier test in this process left installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    real, batches = responses.generate_batches, {"n": 0}

    def ctrl_c_after_two(*args, **kwargs):
        for batch in real(*args, **kwargs):
            if batches["n"] == 2:
                os.kill(os.getpid(), stop)  # Ctrl-C, or `kill` / a scheduler's SIGTERM
                time.sleep(1)  # the handler runs at the next bytecode
            batches["n"] += 1
            yield batch

    monkeypatch.setattr(responses, "generate_batches", ctrl_c_after_two)
    out = tmp_path / "run"
    data = {"responses": "teacher", "generation": {"max_new_tokens": 4, "batch_size": 8}}
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, out, data=data, training={"max_steps": 1}))
    assert main(["train", str(config), "--set", "training.seed=0"]) == 130
    err = capsys.readouterr().err
    assert f"teacher responses: {tiny['teacher']}" in err  # the progress bar names the teacher
    assert f"kdistill: teacher responses: {tiny['teacher']}: interrupted after 16 of 40; they are kept" in err
    assert f"kdistill: resume with: kdistill train {config} --set training.seed=0\n" in err
    assert not out.exists()  # stopped before the run folder was touched

    monkeypatch.setattr(responses, "generate_batches", real)
    assert main(["train", str(config), "--set", "training.seed=0"]) == 0
    assert "16 of 40 kept from an interrupted run" in caplog.text
    [cached] = (Path(os.environ["KDISTILL_CACHE"]) / "responses").iterdir()
    assert cached.suffix == ".json" and len(json.loads(cached.read_text())) == 40
