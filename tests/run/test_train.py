"""End to end on tiny models, through the CLI: train, outputs, refusal, resume, LoRA, validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data.formats import Example
from kdistill.teacher.responses import with_teacher_responses


def _run(tmp_path: Path, tiny: dict, *args: str, **sections: dict) -> tuple[int, Path]:
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "out", **sections))
    return main(["train", str(config), *args]), tmp_path / "out"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_end_to_end_through_the_cli(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture) -> None:
    code, out = _run(
        tmp_path,
        tiny,
        loss={"alpha": 1.0, "temperature": 1.0},
        training={"num_epochs": 3, "learning_rate": 3e-3},
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "KL to teacher" in printed and "perplexity" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["train_rows"] == 40 and summary["validation_rows"] == 8
    assert summary["after"]["kl"] < 0.8 * summary["before"]["kl"]  # the student moved toward the teacher
    records = _metrics(out)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 31))
    assert {"loss/kd", "loss/ce", "lr", "tokens_per_s", "grad_norm"} <= set(train_records[0])
    assert train_records[-1]["loss/kd"] < train_records[0]["loss/kd"]
    assert load_config(out / "kdistill_config.yaml").loss.alpha == 1.0
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 2


def test_trained_tokens_are_counted_per_step(tmp_path: Path, tiny: dict) -> None:
    code, out = _run(tmp_path, tiny, training={"max_steps": 4, "gradient_accumulation_steps": 2})
    assert code == 0
    steps = [r for r in _metrics(out) if "loss" in r]
    assert len(steps) == 4 and all(r["trained_tokens"] > 0 for r in steps)
    assert len({r["trained_tokens"] for r in steps}) > 1  # rows differ in length, so counts differ


def test_non_empty_output_is_refused_then_overwritten(
    tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user file")
    code, out = _run(tmp_path, tiny, training={"max_steps": 1})
    assert code == 2
    assert "is not empty; pass --resume to continue that run or --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").exists() and not (out / "metrics.jsonl").exists()
    code, out = _run(tmp_path, tiny, "--overwrite", training={"max_steps": 1})
    assert code == 0 and not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_bad_config_leaves_nothing_behind(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture) -> None:
    code, out = _run(tmp_path, tiny, training={"learning_rat": 1e-3})
    assert code == 2 and "did you mean 'learning_rate'" in capsys.readouterr().err
    code, out = _run(tmp_path, tiny, data={"source": str(tmp_path / "missing.jsonl")})
    assert code == 2 and "data file not found" in capsys.readouterr().err
    assert not out.exists()


def test_resume_continues_exactly(tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    training = {"max_steps": 14, "save_steps": 6}  # 10 steps an epoch: the checkpoint at 12 is mid-epoch 2
    (tmp_path / "a").mkdir()
    code, straight = _run(tmp_path / "a", tiny, training=training)
    assert code == 0

    from kdistill.run.step import Step

    real_step, calls = Step.__call__, {"n": 0}

    def dies_at_13(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt  # as if the process were stopped mid-run
        return real_step(*args, **kwargs)

    monkeypatch.setattr(Step, "__call__", dies_at_13)
    (tmp_path / "b").mkdir()
    assert _run(tmp_path / "b", tiny, training=training)[0] == 130
    interrupted = tmp_path / "b" / "out"
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step-0000006", "step-0000012"]
    monkeypatch.setattr(Step, "__call__", real_step)
    code, resumed = _run(tmp_path / "b", tiny, "--resume", training=training)
    assert code == 0
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    losses = lambda out: [(r["step"], round(r["loss"], 6)) for r in _metrics(out) if "loss" in r]  # noqa: E731
    assert losses(straight) == losses(resumed)


def test_lora_student_exports_adapter_and_merged_model(tmp_path: Path, tiny: dict) -> None:
    student = {
        "model": str(tiny["student"]),
        "from_teacher": None,
        "finetune": "lora",
        "merge": True,
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
    }
    code, out = _run(tmp_path, tiny, student=student, training={"max_steps": 3, "learning_rate": 1e-2})
    assert (
        code == 0 and (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    )
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny["student"])
    adapted = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(
            merged(ids).logits, AutoModelForCausalLM.from_pretrained(tiny["student"])(ids).logits
        )


def test_teacher_responses_are_generated_once(tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    import kdistill.teacher.responses as responses

    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny["teacher"])
    examples = [
        Example([{"role": "user", "content": f"name the {w}"}], "old") for w in ("sun", "moon", "river")
    ]
    first = with_teacher_responses(examples, teacher, tok, teacher_id="tiny", max_new_tokens=6, batch_size=2)
    assert [e.prompt for e in first] == [e.prompt for e in examples] and all(
        e.response != "old" for e in first
    )
    # A single greedy generation of the same prompt gives the same text as the batched one.
    alone = responses.generate(teacher, tok, [examples[2].prompt], 6, 1)
    assert alone == [first[2].response]
    monkeypatch.setattr(responses, "generate", lambda *a, **k: pytest.fail("should read the cache"))
    again = with_teacher_responses(examples, teacher, tok, teacher_id="tiny", max_new_tokens=6, batch_size=2)
    assert again == first


def test_validate_reports_without_training(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "out"))
    assert main(["validate", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "data: 40 training rows (0 dropped), 8 validation rows (0 dropped), format dolly" in printed
    assert "OK" in printed
    assert not (tmp_path / "out").exists()


def test_validate_names_different_vocabularies(
    tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(tiny["student"])
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(other)
    AutoModelForCausalLM.from_pretrained(tiny["student"]).save_pretrained(other)
    cfg = tiny_config(tiny, tmp_path / "out", student={"model": str(other), "from_teacher": None})
    assert main(["validate", str(write_config(tmp_path / "run.yaml", cfg))]) == 0
    out = capsys.readouterr().out
    # Two added tokens make it another vocabulary: validate says which alignment applies.
    assert f"another tokenizer ({len(tok) - 2:,} tokens against the student's {len(tok):,})" in out
    assert "loss.alignment span" in out and "100% one-to-one" in out


@pytest.mark.parametrize("name", ["seed.yaml", "three-families.yaml"])
def test_hub_configs_validate_offline_with_their_alignment(name: str, capsys: pytest.CaptureFixture) -> None:
    from kdistill.models.loading import hub_reachable

    if hub_reachable():
        pytest.skip("the hub is reachable here; this checks what validate says without it")
    root = Path(__file__).resolve().parents[2]
    assert main(["validate", str(root / "configs" / name)]) == 0
    out = capsys.readouterr().out
    assert (
        "loss.alignment span: Mistral/Llama SentencePiece, 32,000 tokens -> GPT-2 byte-level BPE, 50,295"
        in out
    )
    assert "not checked here, as the hub cannot be reached" in out


def test_help_texts_list_the_commands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--resume" in text and "--overwrite" in text and "--set KEY=VALUE" in text
    assert yaml  # yaml is used by write_config; keep the import honest


def test_length_grouped_batches_cover_every_row_once_with_less_padding() -> None:
    import random

    from kdistill.data.batches import length_grouped_batches

    lengths = [random.Random(i).randint(5, 300) for i in range(203)]
    batches = length_grouped_batches(lengths, batch_size=4, seed=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(203)) and sum(len(b) < 4 for b in batches) == 1
    assert batches == length_grouped_batches(lengths, batch_size=4, seed=3)  # reproducible for resume
    assert batches != length_grouped_batches(lengths, batch_size=4, seed=4)  # a new order each epoch
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    order = random.Random(0).sample(range(203), 203)
    naive = sum(max(lengths[i] for i in order[s : s + 4]) * len(order[s : s + 4]) for s in range(0, 203, 4))
    assert padded < 0.8 * naive


def test_eval_steps_and_tensorboard(tmp_path: Path, tiny: dict) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (kdistill[dev] brings it)")
    code, out = _run(tmp_path, tiny, training={"max_steps": 6, "eval_steps": 2, "report_to": ["tensorboard"]})
    assert code == 0
    eval_steps = [r["step"] for r in _metrics(out) if "eval/kl" in r]
    assert eval_steps == [0, 2, 4, 6]
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_teacher_responses_through_the_cli(tmp_path: Path, tiny: dict) -> None:
    import os

    data = {"responses": "teacher", "generation": {"max_new_tokens": 4, "batch_size": 8}}
    code, out = _run(tmp_path, tiny, data=data, training={"max_steps": 1})
    assert code == 0
    cached = list((Path(os.environ["KDISTILL_CACHE"]) / "responses").glob("*.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())) == 40  # the training rows only


def test_every_validation_row_dropped_is_said_before_training(
    tmp_path: Path, tiny: dict, caplog: pytest.LogCaptureFixture
) -> None:
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"instruction": "say nothing", "response": "  "}) + "\n")
    data = {"validation_source": str(held)}
    config = tiny_config(tiny, tmp_path / "out", data=data, training={"max_steps": 1})
    with caplog.at_level("INFO", logger="kdistill"):
        assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "kdistill"]
    warned = [m for level, m in said if level == "WARNING" and "every validation row was dropped" in m]
    assert len(warned) == 1 and "0 validation rows (1 dropped: 1 with an empty response)" in warned[0]
