"""On-policy distillation on tiny models: config, generation, both losses, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data import Collator
from kdistill.data.tokenize import trained_rows
from kdistill.run.components import build_components
from kdistill.sampling import generate
from kdistill.sampling.generate import Sampling, generated_window


def _run(tmp_path: Path, tiny: dict, *args: str, **sections: dict) -> tuple[int, Path]:
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "out", **sections))
    return main(["train", str(config), *args]), tmp_path / "out"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


ON = {"lmbda": 1.0, "max_new_tokens": 12, "max_prompt_length": 48}


def test_on_policy_steps_generate_and_log(tmp_path: Path, tiny: dict) -> None:
    code, out = _run(tmp_path, tiny, training={"max_steps": 3, "on_policy": ON})
    assert code == 0
    steps = [r for r in _metrics(out) if "loss" in r]
    assert len(steps) == 3
    for record in steps:
        assert record["gen/rows"] == 4 and 0 < record["gen/mean_length"] <= 12
        assert record["gen/tokens_per_s"] > 0 and 0 < record["gen/time_share"] < 1
        assert record["trained_tokens"] == round(record["gen/mean_length"] * 4)


def test_lmbda_zero_is_todays_training_bit_for_bit(tmp_path: Path, tiny: dict) -> None:
    training = {"max_steps": 4}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    code_a, plain = _run(tmp_path / "a", tiny, training=training)
    off = {**ON, "lmbda": 0.0, "mode": "sampled"}
    code_b, zero = _run(tmp_path / "b", tiny, training={**training, "on_policy": off})
    assert code_a == code_b == 0
    a, b = load_file(plain / "model.safetensors"), load_file(zero / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    drop = {"tokens_per_s", "flops_per_s"}  # wall-clock figures
    same = lambda out: [{k: v for k, v in r.items() if k not in drop} for r in _metrics(out) if "loss" in r]  # noqa: E731
    assert same(plain) == same(zero)


def test_resume_after_a_kill_reproduces_generations_and_weights(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    training = {"max_steps": 6, "save_steps": 3, "on_policy": {**ON, "lmbda": 0.5}}
    (tmp_path / "a").mkdir()
    code, straight = _run(tmp_path / "a", tiny, training=training)
    assert code == 0

    from kdistill.run.step import Step

    real_step, calls = Step.__call__, {"n": 0}

    def dies_at_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as if the process were stopped mid-run
        return real_step(*args, **kwargs)

    monkeypatch.setattr(Step, "__call__", dies_at_5)
    (tmp_path / "b").mkdir()
    assert _run(tmp_path / "b", tiny, training=training)[0] == 130
    monkeypatch.setattr(Step, "__call__", real_step)
    code, resumed = _run(tmp_path / "b", tiny, "--resume", training=training)
    assert code == 0
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    keys = ("step", "loss", "trained_tokens", "gen/rows", "gen/mean_length")
    records = lambda out: [tuple(r.get(k) for k in keys) for r in _metrics(out) if "loss" in r]  # noqa: E731
    assert records(straight) == records(resumed)
    assert any(r[3] for r in records(straight)) and not all(r[3] for r in records(straight))  # a mix


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"training": {"on_policy": {"lmbda": 1.5}}}, "training.on_policy.lmbda"),
        ({"training": {"on_policy": {"mode": "rl"}}}, "training.on_policy.mode"),
        ({"training": {"on_policy": {"lmbda": 0.5, "max_new_tokens": 0}}}, "max_new_tokens"),
        ({"training": {"on_policy": {"lmbda": 0.5}}, "loss": {"alpha": 0.0}}, "loss.alpha=0"),
    ],
)
def test_bad_on_policy_configs_get_one_message(
    tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture, sections: dict, message: str
) -> None:
    code, out = _run(tmp_path, tiny, **sections)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_cached_only_teacher_is_refused_before_anything_loads(
    tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    teacher = {"model": None, "cache": str(tmp_path / "cache")}
    code, out = _run(tmp_path, tiny, teacher=teacher, training={"on_policy": {"lmbda": 0.5}})
    err = capsys.readouterr().err
    assert code == 2 and "every teacher is a cache" in err
    assert not out.exists()


def test_validate_prints_the_mix(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture) -> None:
    config = tiny_config(tiny, tmp_path / "out", training={"on_policy": {"lmbda": 0.25}})
    assert main(["validate", str(write_config(tmp_path / "run.yaml", config))]) == 0
    assert "steps: 25% on the student's own samples, 75% on dataset responses" in capsys.readouterr().out


def _own_reverse_kl(student, teacher, batch: dict, tokenizer) -> float:
    """Mean per-token KL(student || teacher) on the student's own samples to `batch`'s prompts."""
    sampling = Sampling(1.0, 12, 1.0, 1.0, 48, tokenizer.eos_token_id, tokenizer.pad_token_id, 8)
    window, _ = generated_window(student, [batch], sampling, Collator(tokenizer.pad_token_id), seed=11)
    own = window[0]
    mask = trained_rows(own["labels"])[0]
    inputs = {"input_ids": own["input_ids"], "attention_mask": own["attention_mask"]}
    with torch.no_grad():
        log_q = torch.log_softmax(student(**inputs).logits[:, :-1][mask], -1)
        log_p = torch.log_softmax(teacher(**inputs).logits[:, :-1][mask], -1)
    return float((log_q.exp() * (log_q - log_p)).sum(-1).mean())


def test_on_policy_training_lowers_reverse_kl_on_own_samples(tmp_path: Path, tiny: dict) -> None:
    config = tiny_config(
        tiny,
        tmp_path / "out",
        loss={"divergence": "reverse_kl", "alpha": 1.0, "temperature": 1.0},
        training={"max_steps": 40, "learning_rate": 3e-3, "on_policy": ON},
    )
    path = write_config(tmp_path / "run.yaml", config)
    parts = build_components(load_config(path), torch.device("cpu"))  # the student as training starts
    tokenizer, teacher = parts.tokenizer, parts.teachers[0].model
    batch = Collator(tokenizer.pad_token_id)(parts.data.validation[:8])
    before = _own_reverse_kl(parts.student, teacher, batch, tokenizer)
    assert main(["train", str(path)]) == 0
    after = _own_reverse_kl(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), teacher, batch, tokenizer)
    assert after < 0.9 * before  # measured: 1.312 -> 1.096 (40 steps)


def test_several_live_teachers_score_generated_batches(tmp_path: Path, tiny: dict) -> None:
    config = tiny_config(tiny, tmp_path / "out", training={"max_steps": 2, "on_policy": ON})
    del config["teacher"]
    config["teachers"] = [
        {"model": str(tiny["teacher"]), "name": "a", "weight": 3.0},
        {"model": str(tiny["student"]), "name": "b", "weight": 1.0},
    ]
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    steps = [r for r in _metrics(tmp_path / "out") if "loss" in r]
    assert all(r["loss/kd/a"] > 0 and r["loss/kd/b"] > 0 and r["gen/rows"] == 4 for r in steps)


def test_lora_student_samples_with_its_adapters(tmp_path: Path, tiny: dict) -> None:
    student = {
        "model": str(tiny["student"]),
        "from_teacher": None,
        "finetune": "lora",
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
    }
    code, out = _run(tmp_path, tiny, student=student, training={"max_steps": 2, "on_policy": ON})
    assert code == 0 and (out / "adapter_model.safetensors").exists()
    assert all(r["gen/rows"] == 4 for r in _metrics(out) if "loss" in r)


def test_a_cached_teacher_teaches_the_off_policy_steps(tmp_path: Path, tiny: dict) -> None:
    config = tiny_config(tiny, tmp_path / "out", training={"max_steps": 6, "on_policy": {**ON, "lmbda": 0.5}})
    del config["teacher"]
    config["teachers"] = [
        {"model": str(tiny["teacher"]), "cache": str(tmp_path / "cache"), "name": "a"},
        {"model": str(tiny["teacher"]), "name": "b"},
    ]
    config["student"] = {"model": str(tiny["student"]), "finetune": "full"}
    path = write_config(tmp_path / "run.yaml", config)
    assert main(["cache", str(path)]) == 0
    assert main(["train", str(path)]) == 0
    steps = [r for r in _metrics(tmp_path / "out") if "loss" in r]
    generated = [r for r in steps if "gen/rows" in r]
    assert 0 < len(generated) < len(steps)
    assert all("loss/kd/a" not in r for r in generated)  # a cache cannot score the student's samples
    assert all(r["loss/kd/a"] > 0 for r in steps if "gen/rows" not in r)


def test_the_shipped_on_policy_config_loads() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "on-policy.yaml")
    assert cfg.training.on_policy.lmbda == 0.5 and cfg.loss.divergence == "reverse_kl"


def test_out_of_memory_in_generation_halves_the_micro_batch(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The student's generation runs inside the out-of-memory back-off: a generation that fails is
    retried with the step on smaller micro-batches, which is then the run with that micro-batch."""
    training = {"max_steps": 3, "batch_size": 4, "on_policy": ON}
    (tmp_path / "small").mkdir(), (tmp_path / "backed").mkdir()
    code, small = _run(tmp_path / "small", tiny, training={**training, "micro_batch_size": 2})
    assert code == 0
    real, failed = generate.sample, []

    def sample(student, rows, sampling, seeds):
        if len(rows) > 2:
            failed.append(len(rows))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(student, rows, sampling, seeds)

    monkeypatch.setattr(generate, "sample", sample)
    code, backed = _run(tmp_path / "backed", tiny, training=training)
    assert code == 0 and failed == [4]
    assert "out of memory at step 1 with a micro-batch of 4 rows" in caplog.text
    a, b = load_file(small / "model.safetensors"), load_file(backed / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    drop = {"tokens_per_s", "flops_per_s", "gen/tokens_per_s", "gen/time_share"}
    same = lambda out: [{k: v for k, v in r.items() if k not in drop} for r in _metrics(out) if "loss" in r]  # noqa: E731
    assert same(small) == same(backed)
