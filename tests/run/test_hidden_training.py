"""Hidden-state distillation in training: the loss term, projections that train and are saved, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import _build_model, tiny_config, write_config
from helpers import batch_loss
from kdistill.cli import main
from kdistill.config import DataConfig, validate_config
from kdistill.data import Collator, build_datasets, trained_rows
from kdistill.errors import KdistillError
from kdistill.losses.hidden import HiddenProjections, auto_layer_pairs, hidden_loss_sums, load_projections
from kdistill.objective.batch import LossSettings, StepSums, StudentLoss
from kdistill.teacher.live import LiveTeacher

NARROW = 32  # the tiny teacher is 64 wide: every layer pair of this student needs a projection


@pytest.fixture(scope="module")
def narrow(tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer student 32 wide, with the tiny teacher's tokenizer."""
    folder = tmp_path_factory.mktemp("narrow")
    tok = AutoTokenizer.from_pretrained(tiny["teacher"])
    tok.save_pretrained(folder)
    # init 0.2: states on the teacher's scale, as a pretrained student's would be.
    _build_model(folder, len(tok), layers=2, seed=2, init_range=0.2, hidden=NARROW)
    return folder


def _narrow_student(narrow: Path, **extra: object) -> dict:
    return {"model": str(narrow), "from_teacher": None, "finetune": "full", **extra}


def _run(tmp_path: Path, tiny: dict, *args: str, **sections: dict) -> tuple[int, Path]:
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "out", **sections))
    return main(["train", str(config), *args]), tmp_path / "out"


def _train_records(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def _batch(tiny: dict, rows: int = 8) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(tiny["teacher"])
    data = build_datasets(DataConfig(source=str(tiny["data"]), max_length=64, validation_size=8), tok, 0)
    return Collator(tok.pad_token_id)(data.train[:rows])


@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_batch_loss_adds_the_weighted_hidden_term(tiny: dict, narrow: Path, distance: str) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(narrow)
    projections = HiddenProjections([(2, 1), (4, 2), (0, 0)], NARROW, 64)
    batch = _batch(tiny)
    settings = LossSettings(
        alpha=0.5, temperature=2.0, chunk_size=16, hidden_weight=0.7, hidden_distance=distance
    )
    sums, count = batch_loss(StudentLoss(student, [projections]), teacher, batch, settings)
    plain, _ = batch_loss(
        StudentLoss(student), teacher, batch, dataclasses.replace(settings, hidden_weight=0)
    )

    # Reference: every layer of both models from a plain forward, compared at the trained rows.
    ids, attention = batch["input_ids"], batch["attention_mask"]
    rows = F.pad(trained_rows(batch["labels"])[0], (0, 1), value=False)
    with torch.no_grad():
        teacher_states = teacher.model(ids, attention_mask=attention, output_hidden_states=True).hidden_states
    student_states = student.model(ids, attention_mask=attention, output_hidden_states=True).hidden_states
    expected = hidden_loss_sums(student_states, teacher_states, rows, projections, distance)
    assert isinstance(sums, StepSums) and count == int(rows.sum()) == expected.count
    torch.testing.assert_close(sums.hidden, expected.total.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.total.detach(), plain.total.detach() + 0.7 * expected.total.detach())
    assert float(sums.hidden) > 0
    sums.total.backward()
    assert all(float(m.weight.grad.abs().sum()) > 0 for m in projections.maps)


def test_each_teacher_weighs_its_own_hidden_term(tiny: dict, narrow: Path, tmp_path: Path) -> None:
    second = tmp_path / "deeper"
    AutoTokenizer.from_pretrained(tiny["teacher"]).save_pretrained(second)
    _build_model(
        second, len(AutoTokenizer.from_pretrained(tiny["teacher"])), layers=3, seed=5, init_range=0.2
    )
    models = [AutoModelForCausalLM.from_pretrained(p).eval() for p in (tiny["teacher"], second)]
    teachers = [
        LiveTeacher(name="a", weight=0.75, model=models[0]),
        LiveTeacher(name="b", weight=0.25, model=models[1]),
    ]
    projections = [
        HiddenProjections([(2, 1), (4, 2)], NARROW, 64),
        HiddenProjections([(2, 1), (3, 2)], NARROW, 64),
    ]
    student = StudentLoss(AutoModelForCausalLM.from_pretrained(narrow), projections)
    batch = _batch(tiny)
    settings = LossSettings(alpha=0.5, temperature=2.0, hidden_weight=1.0)
    sums, _ = batch_loss(student, teachers, batch, settings)
    alone = [
        batch_loss(
            StudentLoss(student.model, [p]),
            [LiveTeacher(name=t.name, weight=1.0, model=t.model)],
            batch,
            settings,
        )
        for p, t in zip(projections, teachers)
    ]
    alone = [sums_alone for sums_alone, _ in alone]
    torch.testing.assert_close(sums.hidden_parts, torch.stack([a.hidden for a in alone]))
    torch.testing.assert_close(sums.hidden, 0.75 * alone[0].hidden + 0.25 * alone[1].hidden)

    # Through the CLI: each teacher's term is logged and its projections get a file of their own.
    config = tiny_config(
        tiny, tmp_path / "out", student=_narrow_student(narrow), loss={"hidden": {"weight": 1.0}}
    )
    del config["teacher"]
    config["teachers"] = [
        {"model": str(tiny["teacher"]), "name": "a", "weight": 3.0},
        {"model": str(second), "name": "b", "weight": 1.0},
    ]
    config["training"]["max_steps"] = 2
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    for r in _train_records(tmp_path / "out"):
        assert r["loss/hidden"] == pytest.approx(0.75 * r["loss/hidden/a"] + 0.25 * r["loss/hidden/b"])
    assert load_projections(tmp_path / "out", "hidden_projections.b.safetensors").pairs == [(2, 1), (3, 2)]
    assert not (tmp_path / "out" / "hidden_projections.safetensors").exists()


def test_hidden_loss_falls_and_projections_are_saved_beside_the_student(
    tmp_path: Path, tiny: dict, narrow: Path
) -> None:
    code, out = _run(
        tmp_path,
        tiny,
        student=_narrow_student(narrow),
        loss={"hidden": {"weight": 1.0, "distance": "cosine"}},
        training={"max_steps": 30, "learning_rate": 1e-2},
    )
    assert code == 0
    records = _train_records(out)
    assert len(records) == 30 and all("loss/hidden" in r for r in records)
    hidden = [r["loss/hidden"] for r in records]
    assert sum(hidden[-3:]) < 0.85 * sum(hidden[:3]), hidden
    for r in records:  # the logged parts add up to the logged total: alpha T^2 KD + (1 - alpha) CE + w hidden
        total = 0.5 * 4.0 * r["loss/kd"] + 0.5 * r["loss/ce"] + 1.0 * r["loss/hidden"]
        assert r["loss"] == pytest.approx(total, rel=1e-5)

    # Beside the student, not in it: the exported model has exactly a plain Llama's weights.
    assert (out / "hidden_projections.safetensors").is_file()
    assert set(load_file(out / "model.safetensors")) == set(load_file(narrow / "model.safetensors"))
    saved = load_projections(out)
    assert saved.pairs == [(2, 1), (4, 2)] and (saved.student_size, saved.teacher_size) == (NARROW, 64)

    # Reloaded, the trained projections fit the trained student better than fresh ones do.
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(out)
    batch = _batch(tiny, rows=16)
    settings = LossSettings(alpha=0.5, temperature=2.0, hidden_weight=1.0, hidden_distance="cosine")
    with torch.no_grad():
        trained = float(batch_loss(StudentLoss(student, [saved]), teacher, batch, settings)[0].hidden)
        fresh = []
        for seed in range(3):
            torch.manual_seed(seed)
            projections = HiddenProjections(saved.pairs, NARROW, 64)
            fresh.append(
                float(batch_loss(StudentLoss(student, [projections]), teacher, batch, settings)[0].hidden)
            )
    assert trained < 0.9 * min(fresh), (trained, fresh)


def test_resume_with_hidden_continues_exactly(
    tmp_path: Path, tiny: dict, narrow: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    sections = {
        "student": _narrow_student(narrow),
        "loss": {"hidden": {"weight": 0.5}},
        "training": {"max_steps": 7, "save_steps": 3, "learning_rate": 3e-3},
    }
    (tmp_path / "a").mkdir()
    code, straight = _run(tmp_path / "a", tiny, **sections)
    assert code == 0

    from kdistill.run.step import Step

    real_step, calls = Step.__call__, {"n": 0}

    def dies_at_7(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # as if the process were stopped mid-run
        return real_step(*args, **kwargs)

    monkeypatch.setattr(Step, "__call__", dies_at_7)
    (tmp_path / "b").mkdir()
    assert _run(tmp_path / "b", tiny, **sections)[0] == 130
    checkpoints = tmp_path / "b" / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000003", "step-0000006"]
    assert (checkpoints / "step-0000006" / "hidden_projections.safetensors").is_file()
    monkeypatch.setattr(Step, "__call__", real_step)
    code, resumed = _run(tmp_path / "b", tiny, "--resume", **sections)
    assert code == 0
    for name in ("model.safetensors", "hidden_projections.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert set(a) == set(b) and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")

    def losses(out: Path) -> list[tuple]:
        return [(r["step"], round(r["loss"], 6), round(r["loss/hidden"], 6)) for r in _train_records(out)]

    assert losses(straight) == losses(resumed)

    # A checkpoint made with loss.hidden cannot be resumed without it: a change to the loss is refused,
    # and even with --force, the optimizer holds its projections.
    capsys.readouterr()
    off = {**sections, "loss": {"hidden": {"weight": 0.0}}}
    assert _run(tmp_path / "b", tiny, "--resume", **off)[0] == 2
    err = capsys.readouterr().err
    assert "changes what the run being resumed trains: " in err and "loss.hidden.weight 0.5 -> 0.0" in err
    assert _run(tmp_path / "b", tiny, "--resume", "--force", **off)[0] == 2
    err = capsys.readouterr().err
    saved = "holds hidden-state projections ['hidden_projections.safetensors']"
    assert f"{saved}, but this config needs none" in err


def test_a_cached_teacher_is_refused_with_its_name(
    tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    config = tiny_config(tiny, tmp_path / "out", loss={"hidden": {"weight": 1.0}})
    del config["teacher"]
    config["teachers"] = [
        {"model": str(tiny["teacher"]), "name": "live"},
        {"model": str(tiny["teacher"]), "name": "stored", "cache": str(tmp_path / "cache")},
    ]
    path = write_config(tmp_path / "run.yaml", config)
    for command in ("validate", "train"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err
        cache = tmp_path / "cache"
        assert f"loss.hidden needs a live teacher, but teacher 'stored' is the cache '{cache}'" in err
        assert "not its hidden states" in err and err.count("kdistill: error") == 1
    assert not (tmp_path / "out").exists()


def test_lora_student_trains_its_projections(tmp_path: Path, tiny: dict, narrow: Path) -> None:
    student = _narrow_student(narrow, finetune="lora", lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    code, out = _run(
        tmp_path,
        tiny,
        student=student,
        loss={"hidden": {"weight": 1.0, "distance": "cosine", "layers": [[4, 2], [2, 1]]}},
        training={"max_steps": 6, "learning_rate": 1e-2},
    )
    assert code == 0
    records = _train_records(out)
    assert records[-1]["loss/hidden"] < records[0]["loss/hidden"]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert not any("maps" in key for key in load_file(out / "adapter_model.safetensors"))
    assert load_projections(out).pairs == [(4, 2), (2, 1)]


def test_from_teacher_pairs_copied_layers_and_validate_says_so(
    tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    # The default tiny student keeps teacher layers 0 and 3 (of 0..3): its states 1 and 2 pair with 1 and 4.
    config = tiny_config(tiny, tmp_path / "out", loss={"hidden": {"weight": 0.5}})
    path = write_config(tmp_path / "run.yaml", config)
    assert main(["validate", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "+ 0.5 * hidden (mse), T = 2.0" in printed
    assert "hidden teacher: 2 layer pairs (teacher, student) [(1, 1), (4, 2)], no projection" in printed
    config["training"]["max_steps"] = 3
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    records = _train_records(tmp_path / "out")
    assert all(r["loss/hidden"] > 0 for r in records)
    assert load_projections(tmp_path / "out").pairs == [(1, 1), (4, 2)]  # equal widths: pairs, no weights


def test_a_pruned_student_pairs_the_layers_it_kept(
    tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    student = {"from_teacher": {"method": "importance", "num_layers": 2, "calibration_rows": 8}}
    config = tiny_config(tiny, tmp_path / "out", student=student, loss={"hidden": {"weight": 0.5}})
    path = write_config(tmp_path / "run.yaml", config)
    assert main(["validate", str(path)]) == 0
    assert (
        "2 layer pairs (teacher, student): each student layer with its original, chosen at calibration"
        in (capsys.readouterr().out)
    )
    assert main(["prune", str(path), "--output", str(tmp_path / "pruned")]) == 0
    kept = json.loads((tmp_path / "pruned" / "importance.json").read_text())["kept"]["layers"]
    expected = [(k + 1, i + 1) for i, k in enumerate(kept)]
    assert expected != auto_layer_pairs(4, 2)  # the same relative depth would pair other layers
    config["training"]["max_steps"] = 2
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    assert load_projections(tmp_path / "out").pairs == expected


def test_explicit_layers_are_checked_against_both_models(
    tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    config = tiny_config(tiny, tmp_path / "out", loss={"hidden": {"weight": 1.0, "layers": [[5, 1]]}})
    assert main(["validate", str(write_config(tmp_path / "run.yaml", config))]) == 2
    err = capsys.readouterr().err
    assert "loss.hidden.layers: pair [5, 1] is out of range: teacher layers are 0..4" in err


@pytest.mark.parametrize(
    "hidden, message",
    [
        ({"weight": -1.0}, "loss.hidden.weight: Input should be greater than or equal to 0"),
        ({"layers": "even"}, "loss.hidden.layers: expected 'auto' or a list of [teacher_layer, student_"),
        ({"layers": [[1, 2, 3]]}, "a pair is [teacher_layer, student_layer], integers >= 0; got [1, 2, 3]"),
        ({"layers": [[1, -2]]}, "integers >= 0; got [1, -2]"),
        ({"distance": "l1"}, "loss.hidden.distance: Input should be 'mse' or 'cosine'"),
        ({"wieght": 1.0}, "unknown key 'loss.hidden.wieght'; did you mean 'weight'?"),
    ],
)
def test_bad_hidden_settings_are_named(hidden: dict, message: str) -> None:
    raw = {"teacher": {"model": "t"}, "student": {"model": "s"}, "loss": {"hidden": hidden}}
    with pytest.raises(KdistillError) as err:
        validate_config(raw)
    assert message in str(err.value)


@pytest.mark.slow  # two fresh processes importing torch and transformers: about 30 s on 2 busy cores
def test_two_processes_train_the_projections_as_one(tmp_path: Path, tiny: dict, narrow: Path) -> None:
    # DDP averages the projections' gradients like the student's: two processes with one batch each
    # match one process accumulating both (see test_distributed.py for the launcher's set-up).
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("the `accelerate` command is not installed next to this Python")
    sections = {"student": _narrow_student(narrow), "loss": {"hidden": {"weight": 1.0}}}
    training = {"max_steps": 4, "learning_rate": 1e-2}
    pair = write_config(
        tmp_path / "pair.yaml", tiny_config(tiny, tmp_path / "pair", training=training, **sections)
    )
    single = {**training, "gradient_accumulation_steps": 2}
    single_config = tiny_config(tiny, tmp_path / "single", training=single, **sections)
    assert main(["train", str(write_config(tmp_path / "single.yaml", single_config))]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    done = subprocess.run(
        [*command, "-m", "kdistill", "train", str(pair)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _train_records(tmp_path / "single"), _train_records(tmp_path / "pair")
    assert [r["loss/hidden"] for r in two] == pytest.approx([r["loss/hidden"] for r in one], rel=1e-5)
    a = load_file(tmp_path / "single" / "hidden_projections.safetensors")
    b = load_file(tmp_path / "pair" / "hidden_projections.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
