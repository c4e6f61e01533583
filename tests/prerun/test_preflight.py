"""`kdistill validate` makes every check `kdistill train` makes before loading weights: one list, one message.

For each check of `prerun/preflight.py`'s list there is a config that fails it. Both commands must stop on
it with exit status 2 and the same message, without loading any model weights; a new check without a
case here fails `test_every_check_has_a_case`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.prerun.checked import Launch
from kdistill.prerun.preflight import CHECKS, LOCAL_CHECKS, MACHINE_CHECKS, MODEL_CHECKS


def _other_vocabulary(tmp: Path, tiny: dict) -> Path:
    """The tiny student with two added tokens: a teacher of another tokenizer."""
    folder = tmp / "other"
    tok = AutoTokenizer.from_pretrained(tiny["student"])
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(folder)
    AutoModelForCausalLM.from_pretrained(tiny["student"]).save_pretrained(folder)
    return folder


def _a_file(path: Path) -> Path:
    path.write_text("x")
    return path


def _odd_role(tmp: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 12
    rows.append({"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]})
    path = tmp / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# check name -> (config sections given the case's folder and the tiny models, the message both give)
Setup = Callable[[Path, dict], dict]
CASES: dict[str, tuple[Setup, str]] = {
    "on_policy_possible": (
        lambda tmp, tiny: {
            "teacher": {"cache": str(tmp / "cache")},
            "training": {"on_policy": {"lmbda": 0.5}},
        },
        "training.on_policy.lmbda=0.5 trains on responses the student writes during training, but every "
        "teacher is a cache",
    ),
    "hidden_teachers_live": (
        lambda tmp, tiny: {"teacher": {"cache": str(tmp / "cache")}, "loss": {"hidden": {"weight": 1.0}}},
        "loss.hidden needs a live teacher, but teacher 'teacher' is the cache 'TMP/cache'",
    ),
    "output_dir_usable": (
        lambda tmp, tiny: {"output_dir": str(_a_file(tmp / "out"))},
        "output_dir TMP/out exists and is not a folder",
    ),
    "model_sources_resolve": (
        lambda tmp, tiny: {"teacher": {"gguf_file": "model-q4.gguf"}},
        "model 'TINY/teacher': gguf_file 'model-q4.gguf' is not in TINY/teacher; it holds no .gguf file",
    ),
    "responses_teacher_live": (
        lambda tmp, tiny: {"teacher": {"cache": str(tmp / "cache")}, "data": {"responses": "teacher"}},
        "data.responses: teacher needs a live teacher; give teacher.model without a cache",
    ),
    "quantization_supported": (
        lambda tmp, tiny: {
            "teacher": {"quantization": "4bit"},
            "student": {"model": str(tiny["student"]), "from_teacher": None},
        },
        "teacher.quantization=4bit needs ",
    ),
    "engine_python_exists": (
        lambda tmp, tiny: {
            "training": {
                "on_policy": {"lmbda": 1.0, "engine": {"kind": "vllm", "python": str(tmp / "no-venv/python")}}
            }
        },
        "training.on_policy.engine.python='TMP/no-venv/python': no Python there to start the student's",
    ),
    "engine_processes": (  # launched as two FSDP processes (`_sharded_launch`)
        lambda tmp, tiny: {
            "training": {
                "on_policy": {"lmbda": 1.0, "engine": {"kind": "vllm", "server": "http://127.0.0.1:9"}}
            }
        },
        "training.on_policy.engine=vllm with 2 processes under FSDP: the engine is synced from the main "
        "process's copy of the student, which FSDP and ZeRO-3 shard",
    ),
    "disk_space_fits": (  # 100 kB free on this machine
        lambda tmp, tiny: {},
        "output_dir TMP/out: 100.0 kB free, but one checkpoint (1.1 MB) and the final student (378.1 kB) "
        "need 1.5 MB; free some space there or choose another output_dir",
    ),
    "vocabularies_match": (
        lambda tmp, tiny: {
            "teacher": {"model": str(_other_vocabulary(tmp, tiny))},
            "student": {"model": str(tiny["student"]), "from_teacher": None},
            "loss": {"hidden": {"weight": 1.0}},
        },
        "loss.hidden pairs the teacher's and the student's states position by position, but teacher 'other' "
        "uses another tokenizer than the student (its positions differ); set loss.hidden.weight: 0 or use a "
        "teacher of the student's tokenizer",
    ),
    "student_from_teacher": (
        lambda tmp, tiny: {"student": {"from_teacher": {"num_layers": 9}}},
        "student.from_teacher.num_layers=9: the teacher has 4 layers",
    ),
    "max_length_fits": (
        lambda tmp, tiny: {"data": {"max_length": 300}},
        "data.max_length=300 is beyond the context of the teacher copied by student.from_teacher (256 "
        "positions, its max_position_embeddings); set data.max_length to at most 256",
    ),
    "lora_targets_match": (
        lambda tmp, tiny: {"student": {"finetune": "lora", "lora": {"target_modules": ["qkv"]}}},
        "student.lora.target_modules: 'qkv' names no module of the student (of ['qkv']); the student's "
        "linear layers are named down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
    ),
    "hidden_layers_resolve": (
        lambda tmp, tiny: {"loss": {"hidden": {"weight": 1.0, "layers": [[5, 1]]}}},
        "loss.hidden.layers: pair [5, 1] is out of range: teacher layers are 0..4",
    ),
    "data_reads": (
        lambda tmp, tiny: {"data": {"source": str(_odd_role(tmp))}},
        "TMP/chat.jsonl:13, message 1: role 'tool' is not one of system, user, assistant",
    ),
    "on_policy_vocabularies": (
        lambda tmp, tiny: {
            "teacher": {"model": str(_other_vocabulary(tmp, tiny))},
            "student": {"model": str(tiny["student"]), "from_teacher": None},
            "training": {"on_policy": {"lmbda": 0.5, "mode": "sampled"}},
        },
        "training.on_policy.mode=sampled with teacher(s) of another tokenizer (other): that mode needs the "
        "teacher's log-prob of each token the student sampled",
    ),
}


def _sharded_launch(accelerator: object = None) -> Launch:
    return Launch(processes=2, kind="FSDP", sharded=True)


def test_every_check_has_a_case() -> None:
    assert [check.__name__ for check in CHECKS] == list(CASES)


def test_validate_runs_every_check_of_the_list() -> None:
    """validate runs the list in three parts (those that read no model file, those of the machine, those
    that read models and data); together they are the list train runs, in its order."""
    assert LOCAL_CHECKS + MACHINE_CHECKS + MODEL_CHECKS == CHECKS


def _run(command: str, config: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main([command, str(config)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.removeprefix("kdistill: error: ").strip()


@pytest.mark.parametrize("check", CHECKS, ids=[check.__name__ for check in CHECKS])
def test_validate_and_train_refuse_alike_without_loading_weights(
    check: Callable,
    tmp_path: Path,
    tiny: dict,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    setup, message = CASES[check.__name__]
    if check in MACHINE_CHECKS:  # a machine without bitsandbytes, launched as two FSDP processes
        monkeypatch.setattr("kdistill.models.build.bitsandbytes_version", lambda: None)
        monkeypatch.setattr("kdistill.prerun.preflight.launch_of", _sharded_launch)
        monkeypatch.setattr("kdistill.files.free_bytes", lambda path: 100_000)
    sections = setup(tmp_path, tiny)
    out = Path(sections.pop("output_dir", tmp_path / "out"))
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, out, **sections))
    message = message.replace("TMP", str(tmp_path)).replace("TINY", str(tiny["root"]))
    capsys.readouterr()

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_weights))
    code, printed, err = _run("validate", config, capsys)
    if check in MACHINE_CHECKS:  # depends on the machine: validate reports it, train here refuses
        assert code == 0 and f"on this machine, train would refuse: {message}" in printed
    else:
        assert (code, err[: len(message)]) == (2, message)
    code, _, train_err = _run("train", config, capsys)
    assert (code, train_err[: len(message)]) == (2, message)
    if check not in MACHINE_CHECKS:
        assert train_err == err  # the same message, whole
    assert "Traceback" not in err + train_err
    assert not out.is_dir() or not any(out.iterdir())  # refused before anything was written


# Lists that name things: one entry that resolves to nothing is refused, though the others resolve.
PARTIAL: dict[str, tuple[dict, str]] = {
    "lora_targets_match": (
        {"student": {"finetune": "lora", "lora": {"target_modules": ["q_proj", "nonexistent_proj"]}}},
        "student.lora.target_modules: 'nonexistent_proj' names no module of the student (of ['q_proj', "
        "'nonexistent_proj']); the student's linear layers are named down_proj, gate_proj, k_proj, lm_head, "
        "o_proj, q_proj, up_proj, v_proj",
    ),
    "hidden_layers_resolve": (
        {"loss": {"hidden": {"weight": 1.0, "layers": [[2, 1], [4, 9]]}}},
        "loss.hidden.layers: pair [4, 9] is out of range: teacher layers are 0..4, student layers 0..2 (0 is "
        "the embedding output)",
    ),
    "hidden_layers_resolve_twice": (
        {"loss": {"hidden": {"weight": 1.0, "layers": [[2, 1], [4, 2], [2, 1]]}}},
        "loss.hidden.layers: pair [2, 1] is listed twice",
    ),
}


@pytest.mark.parametrize("case", PARTIAL)
def test_one_entry_that_resolves_to_nothing_is_refused(
    case: str, tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    sections, message = PARTIAL[case]
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "out", **sections))
    capsys.readouterr()
    for command in ("validate", "train"):
        code, _, err = _run(command, config, capsys)
        assert (code, err) == (2, message), command
