"""Config loading, the guide's keys, overrides and the messages for bad values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdistill.config import load_config, save_config, validate_config
from kdistill.errors import KdistillError

ROOT = Path(__file__).resolve().parents[2]
BASE = {"teacher": {"model": "t"}, "student": {"model": "s"}}


def _error(raw: dict) -> str:
    with pytest.raises(KdistillError) as info:
        validate_config(raw, source="run.yaml")
    return str(info.value)


def test_guide_keys_under_training_are_accepted_and_move_to_loss() -> None:
    cfg = validate_config(
        {
            **BASE,
            "training": {
                "num_epochs": 3,
                "batch_size": 4,
                "learning_rate": 5e-5,
                "temperature": 3.0,
                "alpha": 0.5,
                "gradient_accumulation_steps": 2,
            },
        }
    )
    assert (cfg.loss.temperature, cfg.loss.alpha) == (3.0, 0.5)
    assert (cfg.training.num_epochs, cfg.training.batch_size, cfg.training.gradient_accumulation_steps) == (
        3,
        4,
        2,
    )
    assert cfg.training.temperature is None  # one value, in one place


def test_flat_seed_keys_are_nested(tmp_path: Path) -> None:
    path = tmp_path / "flat.json"
    path.write_text(
        json.dumps(
            {
                "teacher_model": "mistralai/Mistral-7B-v0.1",
                "student_model": "microsoft/phi-2",
                "num_epochs": 3,
                "batch_size": 4,
                "learning_rate": 5e-5,
                "temperature": 3.0,
                "alpha": 0.5,
                "gradient_accumulation_steps": 2,
            }
        )
    )
    cfg = load_config(path)
    assert cfg.teacher.model == "mistralai/Mistral-7B-v0.1" and cfg.student.model == "microsoft/phi-2"
    assert cfg.loss.temperature == 3.0 and cfg.training.learning_rate == 5e-5


def test_conflicting_alias_is_an_error() -> None:
    message = _error({**BASE, "training": {"alpha": 0.2}, "loss": {"alpha": 0.7}})
    assert "training.alpha=0.2 conflicts with loss.alpha=0.7" in message


def test_unknown_key_names_the_nearest_valid_one() -> None:
    message = _error({**BASE, "training": {"learnig_rate": 1e-4}})
    assert "unknown key 'training.learnig_rate'; did you mean 'learning_rate'?" in message
    assert message.startswith("run.yaml: invalid config")


def test_a_misspelt_choice_names_the_nearest_valid_one() -> None:
    data, training = {"source": "x", "format": "dollly"}, {"mixed_precision": "bf61"}
    message = _error({**BASE, "data": data, "training": training})
    expected = "'auto', 'dolly', 'alpaca', 'chat' or 'text'; did you mean 'dolly'? (got 'dollly')"
    assert f"data.format: Input should be {expected}" in message
    assert "training.mixed_precision: " in message and "did you mean 'bf16'?" in message
    assert "did you mean" not in _error({**BASE, "data": {"source": "x", "format": "zzzzzz"}})


def test_unknown_top_level_key_lists_valid_keys() -> None:
    assert "unknown key 'trainer'; did you mean 'training'?" in _error({**BASE, "trainer": {}})


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("loss", "temperature", 0, "loss.temperature: Input should be greater than 0 (got 0)"),
        ("loss", "alpha", 1.5, "loss.alpha: Input should be less than or equal to 1 (got 1.5)"),
        ("loss", "alpha", -0.1, "loss.alpha: Input should be greater than or equal to 0 (got -0.1)"),
        ("training", "batch_size", 0, "training.batch_size: Input should be greater than 0 (got 0)"),
        (
            "training",
            "gradient_accumulation_steps",
            -2,
            "training.gradient_accumulation_steps: Input should be greater than 0 (got -2)",
        ),
        (
            "loss",
            "divergence",
            "kl",
            "loss.divergence: Input should be 'forward_kl', 'reverse_kl', 'jsd', 'skew_kl', "
            "'skew_reverse_kl' or 'tvd'; did you mean 'forward_kl'? (got 'kl')",
        ),
        ("loss", "skew", 1, "loss.skew: must be in [0, 1) (got 1)"),
        ("loss", "beta", 1.5, "loss.beta: must be in [0, 1] (got 1.5)"),
        ("teacher", "quantization", "3bit", "teacher.quantization: Input should be 'none', '8bit' or '4bit'"),
    ],
)
def test_out_of_range_values_name_key_and_value(section: str, key: str, value: object, expected: str) -> None:
    raw = {**BASE, section: {**BASE.get(section, {}), key: value}}
    assert expected in _error(raw)


def test_every_problem_is_reported_at_once() -> None:
    message = _error({**BASE, "loss": {"temperature": -1, "alpha": 2}, "training": {"batch_size": 0}})
    assert message.count("\n  - ") == 3


def test_student_needs_exactly_one_source() -> None:
    assert "give `student.model` or `student.from_teacher" in _error(
        {"teacher": {"model": "t"}, "student": {}}
    )


def test_overrides_reach_any_key_with_yaml_types(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(
        path,
        [
            "training.learning_rate=1e-5",
            "data.max_length=512",
            "student.finetune=full",
            "training.report_to=[tensorboard]",
            "loss.chunk_size=null",
        ],
    )
    assert cfg.training.learning_rate == 1e-5 and cfg.data.max_length == 512
    assert cfg.student.finetune == "full" and cfg.training.report_to == ["tensorboard"]
    assert cfg.loss.chunk_size is None


def test_bad_override_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(KdistillError, match="expected KEY=VALUE"):
        load_config(path, ["training.learning_rate"])
    with pytest.raises(KdistillError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("teacher: [unclosed\n")
    with pytest.raises(KdistillError, match="broken.yaml: not valid YAML"):
        load_config(broken)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = validate_config({**BASE, "training": {"temperature": 4.0}})
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg and again.loss.temperature == 4.0


def test_seed_recipe_states_the_guide_exactly() -> None:
    cfg = load_config(ROOT / "configs" / "seed.yaml")
    assert cfg.teacher.model == "mistralai/Mistral-7B-v0.1" and cfg.teacher.quantization == "4bit"
    assert (
        cfg.student.model == "microsoft/phi-2" and cfg.student.finetune == "lora" and cfg.student.lora.r == 16
    )
    assert cfg.data.source == "databricks/databricks-dolly-15k"
    t = cfg.training
    assert (t.num_epochs, t.batch_size, t.learning_rate, t.gradient_accumulation_steps) == (3, 4, 5e-5, 2)
    assert (cfg.loss.temperature, cfg.loss.alpha) == (3.0, 0.5)


@pytest.mark.parametrize(
    "name",
    [
        "quickstart.yaml",
        "same-tokenizer.yaml",
        "quickstart-cached.yaml",
        "multi-teacher.yaml",
        "retention.yaml",
    ],
)
def test_shipped_configs_validate(name: str) -> None:
    load_config(ROOT / "configs" / name)


def test_teachers_list_names_weights_and_the_first_teacher() -> None:
    cfg = load_config(ROOT / "configs" / "multi-teacher.yaml")
    assert [(name, t.weight) for name, t in cfg.teacher_list()] == [("qwen7b", 2.0), ("qwen3b", 1.0)]
    assert cfg.teacher.model == "Qwen/Qwen2.5-7B-Instruct" and cfg.loss.multi_teacher == "mixture"
    assert cfg.teachers[0].cache == "runs/multi-teacher/cache-qwen7b"


def test_teacher_needs_a_model_or_a_cache(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("teacher: {weight: 1.0}\nstudent: {model: x}\n")
    with pytest.raises(KdistillError, match="give the teacher's `model`, its `cache` folder, or both"):
        load_config(path)
    path.write_text("teacher: {model: a}\nteachers: [{model: b}]\nstudent: {model: x}\n")
    with pytest.raises(KdistillError, match="give `teacher` or a `teachers` list, not both"):
        load_config(path)


def test_a_byte_order_mark_is_valid_in_yaml_and_json_configs(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("\ufeff" + yaml.safe_dump(BASE), encoding="utf-8")
    (tmp_path / "run.json").write_text("\ufeff" + json.dumps(BASE), encoding="utf-8")
    for name in ("run.yaml", "run.json"):
        assert load_config(tmp_path / name).teacher.model == BASE["teacher"]["model"]


def test_two_teachers_of_one_name_are_refused() -> None:
    teachers = [{"model": "org/smol"}, {"model": "other/smol", "weight": 2}]
    raw = {"teachers": teachers, "student": {"model": "s"}}
    assert "several teachers are named 'smol'" in _error(raw) and "give each a distinct `name`" in _error(raw)
    named = {**raw, "teachers": [{"model": "org/smol"}, {"model": "other/smol", "name": "smol2"}]}
    assert [n for n, _ in validate_config(named).teacher_list()] == ["smol", "smol2"]
