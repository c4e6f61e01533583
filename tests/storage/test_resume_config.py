"""`--resume` with a changed config: changes to what is trained are refused (or forced), others applied;
each checkpoint keeps its config and config_history.yaml records both with the step."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.config import load_config

TRAINING = {"max_steps": 8, "save_steps": 4, "save_total_limit": 2}


@pytest.fixture
def finished(tmp_path: Path, tiny: dict) -> tuple[Path, Path]:
    """A run of 8 steps with a checkpoint at step 4; returns (config, output_dir)."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, out, training=TRAINING))
    assert main(["train", str(config)]) == 0
    return config, out


def test_each_checkpoint_keeps_its_config(finished: tuple[Path, Path]) -> None:
    config, out = finished
    kept = load_config(out / "checkpoints" / "step-0000004" / "kdistill_config.yaml")
    assert kept == load_config(config)


def test_a_change_to_what_is_trained_is_refused_naming_old_and_new(
    finished: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    config, out = finished
    before = (out / "kdistill_config.yaml").read_text()
    capsys.readouterr()
    sets = ["--set", "loss.temperature=5.0", "--set", "training.learning_rate=0.0001"]

    assert main(["train", str(config), "--resume", *sets]) == 2

    err = capsys.readouterr().err
    checkpoint = out / "checkpoints" / "step-0000004"
    assert err.strip() == (
        "kdistill: error: --resume: this config changes what the run being resumed trains: loss.temperature "
        "2.0 -> 5.0, training.learning_rate 0.001 -> 0.0001 (its config: "
        f"{checkpoint / 'kdistill_config.yaml'}). Resume with its values, add --force to continue from step "
        "4 with these anyway (config_history.yaml then records both), or --overwrite to start again"
    )
    assert (out / "kdistill_config.yaml").read_text() == before and not (out / "config_history.yaml").exists()


def test_more_steps_and_logging_are_applied_and_recorded(
    finished: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    config, out = finished
    caplog.set_level(logging.INFO, "kdistill")
    sets = ["--set", "training.max_steps=10", "--set", "training.logging_steps=2"]

    assert main(["train", str(config), "--resume", *sets]) == 0

    assert (
        "--resume: applied from step 4: training.logging_steps 1 -> 2, training.max_steps 8 -> 10"
        in caplog.text
    )
    assert load_config(out / "kdistill_config.yaml").training.max_steps == 10  # the config now in force
    history = yaml.safe_load((out / "config_history.yaml").read_text())
    assert [(h["from_step"], h["config"]["training"]["max_steps"]) for h in history] == [(0, 8), (4, 10)]
    assert history[1]["changed"]["training.max_steps"] == {"old": 8, "new": 10}
    assert history[1]["forced"] is False
    assert main(["report", str(out)]) == 0  # eval and report still read kdistill_config.yaml


def test_force_continues_with_the_change_and_records_it(
    finished: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    config, out = finished
    sets = ["--set", "loss.temperature=5.0", "--set", "training.max_steps=10"]  # a checkpoint at 8 too
    assert main(["train", str(config), "--resume", "--force", *sets]) == 0
    assert "--resume --force: from step 4, training with loss.temperature 2.0 -> 5.0" in caplog.text
    history = yaml.safe_load((out / "config_history.yaml").read_text())
    assert history[1]["forced"] is True
    assert history[1]["changed"]["loss.temperature"] == {"old": 2.0, "new": 5.0}
    kept = out / "checkpoints"
    assert load_config(kept / "step-0000004" / "kdistill_config.yaml").loss.temperature == 2.0
    assert load_config(kept / "step-0000008" / "kdistill_config.yaml").loss.temperature == 5.0


def test_a_folder_is_refused_before_any_model_loads(
    finished: tuple[Path, Path], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import PreTrainedModel

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_weights))
    config, out = finished
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err.startswith(
        f"kdistill: error: output_dir {out} is not empty; pass --resume"
    )
    assert main(["train", str(config), "--resume", "--set", "loss.alpha=0.9"]) == 2
    assert "loss.alpha 0.5 -> 0.9" in capsys.readouterr().err


def test_a_folder_no_step_was_saved_in_is_taken_over(
    tmp_path: Path, tiny: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that stopped before its first checkpoint leaves its config, logs and metrics: a plain
    `train` reuses the folder."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, out, training={"max_steps": 2}))
    (out / "logs").mkdir(parents=True)
    (out / "checkpoints" / "step-0000004.tmp").mkdir(parents=True)
    (out / "kdistill_config.yaml").write_text(Path(config).read_text())
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    caplog.set_level(logging.INFO, "kdistill")

    assert main(["train", str(config)]) == 0

    assert f"output_dir {out}: no step of the run that left it was saved; starting it afresh" in caplog.text
    assert not (out / "checkpoints" / "step-0000004.tmp").exists()
    assert '"loss": 9.0' not in (out / "metrics.jsonl").read_text()


def test_force_without_resume_is_refused(tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "run"))
    assert main(["train", str(config), "--force"]) == 2
    assert "--force goes with --resume" in capsys.readouterr().err


def test_fewer_steps_count_as_a_change_to_what_is_trained() -> None:
    from kdistill.storage.resume_config import _harmless

    assert _harmless("training.max_steps", 8, 10) and not _harmless("training.max_steps", 8, 6)
    assert _harmless("training.max_minutes", 15, 60) and not _harmless("training.max_minutes", 60, 15)
    assert _harmless("training.health.window", 200, 50) and not _harmless("training.seed", 0, 1)
    assert _harmless("output_dir", "runs/a", "moved/a")  # a run folder copied elsewhere
