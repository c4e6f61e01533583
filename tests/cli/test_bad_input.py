"""Bad input, one table: each case gets one clear message, and nothing half-written is left behind.

Every case runs `kdistill train` (or the bare command line) on the tiny models. The whole error text
is compared, with TMP standing for the case's folder, and the folder's files (and the cache's) must
be exactly as they were before the command ran.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import dolly_rows, tiny_config, write_config
from kdistill.cli import main


class Case:
    """What a setup function gets: the case's folder, the tiny models, and writers for its files."""

    def __init__(self, tmp: Path, tiny: dict) -> None:
        self.tmp, self.tiny = tmp, tiny

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return path

    def rows(self, name: str, rows: list) -> Path:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))

    def train(self, *args: str, files: dict[str, str] | None = None, **sections: dict) -> list[str]:
        """The command line for the tiny run with these config sections, after writing `files`."""
        for name, text in (files or {}).items():
            self.file(name, text)
        config = write_config(self.tmp / "run.yaml", tiny_config(self.tiny, self.tmp / "out", **sections))
        return ["train", str(config), *args]

    def data(self, path: Path, **data: object) -> list[str]:
        return self.train(data={"source": str(path), **data})


@dataclass
class Bad:
    name: str
    setup: Callable[[Case], list[str]]
    message: str  # the text after "kdistill: error: " (or argparse's "kdistill train: error: ")
    code: int = 2


GOOD = dolly_rows(4)
DOLLY_COLUMNS = "chat: messages; dolly: instruction, response; alpaca: instruction, output; text: text"


def _unshrinkable(case: Case) -> list[str]:
    """A BART decoder as teacher: its num_hidden_layers counts the encoder (3), its decoder has 2."""
    from transformers import AutoTokenizer, BartConfig, BartForCausalLM

    folder = case.tmp / "bart"
    tokenizer = AutoTokenizer.from_pretrained(case.tiny["teacher"])
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=16,
        encoder_layers=3,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=128,
    )
    BartForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return case.train(teacher={"model": str(folder)})


def _broken_model(case: Case, name: str, text: str) -> list[str]:
    """A teacher folder with the tiny tokenizer and `name` holding `text` (a damaged model file)."""
    from transformers import AutoTokenizer

    folder = case.tmp / "broken"
    AutoTokenizer.from_pretrained(case.tiny["teacher"]).save_pretrained(folder)
    case.file(f"broken/{name}", text)
    return case.train(teacher={"model": str(folder)})


def _truncated_teacher(case: Case) -> list[str]:
    """A copy of the tiny teacher whose weights file was cut short (a full disk, an interrupted copy)."""
    folder = case.tmp / "broken"
    shutil.copytree(case.tiny["teacher"], folder)
    with open(folder / "model.safetensors", "r+b") as handle:
        handle.truncate(50_000)
    return case.train(teacher={"model": str(folder)})


def _cache_is_a_file(case: Case) -> list[str]:
    os.environ["KDISTILL_CACHE"] = str(case.file("cache", "x"))  # the test restores it
    return case.train(data={"responses": "teacher", "generation": {"max_new_tokens": 2}})


def _read_only(case: Case) -> list[str]:
    out = case.tmp / "out"
    out.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits; an immutable folder stops it too
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(out)]).returncode:
            pytest.skip("running as root without chattr: cannot make a read-only folder")
    else:
        out.chmod(0o555)
    return case.train()


def _read_only_message() -> str:
    reason = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
    return (
        f"output_dir TMP/out cannot be written: TMP/out is not writable ({reason}); "
        "choose another output_dir or change the folder's permissions"
    )


def _resumed_with_other_batch(case: Case) -> list[str]:
    assert main(case.train(training={"max_steps": 2, "save_steps": 1})) == 0
    return case.train("--resume", training={"max_steps": 3, "save_steps": 1, "batch_size": 2})


CASES = [
    # data
    Bad("data-missing-file", lambda c: c.data(c.tmp / "nope.jsonl"), "data file not found: TMP/nope.jsonl"),
    Bad(
        "data-malformed-line",
        lambda c: c.data(c.file("d.jsonl", json.dumps(GOOD[0]) + "\n{instruction: 1}\n")),
        "TMP/d.jsonl:2: malformed JSON line (Expecting property name enclosed in double quotes at column 2)",
    ),
    Bad(
        "data-row-not-object",
        lambda c: c.data(c.rows("d.jsonl", [GOOD[0], [1, 2]])),
        "TMP/d.jsonl:2: expected a JSON object, got list",
    ),
    Bad("data-empty", lambda c: c.data(c.file("d.jsonl", "\n")), "TMP/d.jsonl: the dataset is empty"),
    Bad(
        "data-unknown-columns",
        lambda c: c.data(c.rows("d.jsonl", [{"question": "q", "answer": "a"}])),
        f"TMP/d.jsonl: none of the known column sets found. Columns: ['answer', 'question']. "
        f"Expected {DOLLY_COLUMNS}",
    ),
    Bad(
        "data-row-lacks-response",
        lambda c: c.data(c.rows("d.jsonl", [*GOOD, {"instruction": "x"}])),
        "TMP/d.jsonl:5 (dolly format) lacks response",
    ),
    Bad(
        "data-wrong-type",
        lambda c: c.data(c.rows("d.jsonl", [{"messages": "hello"}])),
        "TMP/d.jsonl:1: `messages` must be a non-empty list of {role, content}",
    ),
    Bad(
        "data-chat-ends-with-user",
        lambda c: c.data(c.rows("d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])),
        "TMP/d.jsonl:1: the last message must be the assistant's (it is the response to learn)",
    ),
    Bad(
        "data-unknown-role",
        lambda c: c.data(
            c.rows(
                "d.jsonl",
                [{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "a"}]}],
            )
        ),
        "TMP/d.jsonl:1, message 1: role 'bot' is not one of system, user, assistant",
    ),
    Bad(
        "data-every-response-empty",
        lambda c: c.data(
            c.rows("d.jsonl", [{**row, "response": " \n"} for row in dolly_rows(12)]), validation_size=2
        ),
        "TMP/d.jsonl: all 10 training rows have an empty response (and 2 of the 2 held-out rows); "
        "nothing to learn",
    ),
    Bad(
        "data-prompt-longer-than-max-length",
        lambda c: c.data(c.rows("d.jsonl", dolly_rows(12)), max_length=6, validation_size=2),
        "TMP/d.jsonl: no training row has a response token left within data.max_length=6; "
        "raise data.max_length or shorten the prompts",
    ),
    Bad(
        "data-not-utf8",
        lambda c: c.data(c.file("d.jsonl", json.dumps(GOOD[0]).encode() + b"\n\xff\xfe\n")),
        "TMP/d.jsonl:2: not UTF-8 text; save the file as UTF-8",
    ),
    Bad("data-is-a-folder", lambda c: c.data(c.tmp), "TMP is a folder; data.source must be a data file"),
    Bad(
        "data-bad-json",
        lambda c: c.data(c.file("d.json", '[{"instruction": "a",\n "response": }]')),
        "TMP/d.json:2: malformed JSON (Expecting value at column 14)",
    ),
    Bad(
        "data-json-not-a-list",
        lambda c: c.data(c.file("d.json", '{"rows": 3}')),
        'TMP/d.json: expected a JSON list of objects (or {"data": [...]})',
    ),
    Bad(
        "data-unsupported-type",
        lambda c: c.data(c.file("d.txt", "hello")),
        "TMP/d.txt: unsupported file type '.txt'; expected one of .jsonl, .json, .csv, .parquet",
    ),
    Bad(
        "data-bad-parquet",
        lambda c: c.data(c.file("d.parquet", "not parquet at all")),
        "TMP/d.parquet: not a readable parquet file (Could not open Parquet input source 'TMP/d.parquet': "
        "Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet "
        "file.)",
    ),
    Bad(
        "data-validation-takes-all",
        lambda c: c.data(c.rows("d.jsonl", GOOD), validation_size=4),
        "TMP/d.jsonl: data.validation_size=4.0 leaves no training rows out of 4",
    ),
    # config
    Bad(
        "config-missing",
        lambda c: ["train", str(c.tmp / "nope.yaml")],
        "config file not found: TMP/nope.yaml",
    ),
    Bad(
        "config-not-yaml",
        lambda c: ["train", str(c.file("run.yaml", "teacher: [unclosed\n"))],
        'TMP/run.yaml: not valid YAML: while parsing a flow sequence\n  in "<unicode string>", line 1, '
        "column 10:\n    teacher: [unclosed\n             ^\nexpected ',' or ']', but got "
        "'<stream end>'\n  in \"<unicode string>\", line 2, column 1:\n    \n    ^",
    ),
    Bad(
        "config-not-a-mapping",
        lambda c: ["train", str(c.file("run.yaml", "- teacher\n"))],
        "TMP/run.yaml: expected a mapping of sections (teacher, student, ...), got list",
    ),
    Bad(
        "config-typo",
        lambda c: c.train(training={"learnig_rate": 1e-3}),
        "TMP/run.yaml: invalid config\n  - unknown key 'training.learnig_rate'; "
        "did you mean 'learning_rate'?",
    ),
    Bad(
        "config-wrong-type",
        lambda c: c.train(training={"batch_size": "four"}),
        "TMP/run.yaml: invalid config\n  - training.batch_size: Input should be a valid integer, unable to "
        "parse string as an integer (got 'four')",
    ),
    Bad(
        "config-out-of-range",
        lambda c: c.train(loss={"alpha": 1.5}),
        "TMP/run.yaml: invalid config\n  - loss.alpha: Input should be less than or equal to 1 (got 1.5)",
    ),
    Bad(
        "config-conflicting-alpha",
        lambda c: c.train(training={"alpha": 0.3}),
        "TMP/run.yaml: invalid config\n  - training.alpha=0.3 conflicts with loss.alpha=0.5; give one",
    ),
    Bad(
        "config-two-students",
        lambda c: c.train(student={"model": str(c.tiny["student"])}),
        "TMP/run.yaml: invalid config\n  - student: give either `student.model` or `student.from_teacher`, "
        "not both",
    ),
    Bad(
        "config-micro-batch-too-large",
        lambda c: c.train(training={"micro_batch_size": 8}),
        "TMP/run.yaml: invalid config\n  - training: training.micro_batch_size=8 is larger than "
        "training.batch_size=4; it splits a batch, so it must not exceed it",
    ),
    Bad(
        "config-health-window",
        lambda c: c.train(training={"health": {"window": 1}}),
        "TMP/run.yaml: invalid config\n  - training.health.window: Input should be greater than or equal "
        "to 2 (got 1)",
    ),
    Bad(
        "config-bad-set",
        lambda c: [*c.train(), "--set", "training.learning_rate"],
        "--set 'training.learning_rate': expected KEY=VALUE, e.g. --set training.learning_rate=1e-5",
    ),
    Bad(
        "config-set-not-yaml",
        lambda c: [*c.train(), "--set", "data.max_length=[1,"],
        "--set 'data.max_length=[1,': the value '[1,' is not valid YAML (expected the node content, but "
        "found '<stream end>'); quote it to give it as text, e.g. --set 'data.max_length=\"[1,\"'",
    ),
    Bad(
        "config-not-utf8",
        lambda c: ["train", str(c.file("run.yaml", b"teacher: caf\xe9\n"))],
        "TMP/run.yaml: not UTF-8 text; save the config as UTF-8",
    ),
    # models
    Bad(
        "model-gguf-file-not-in-folder",
        lambda c: c.train(
            files={"broken/a.gguf": ""}, teacher={"model": str(c.tmp / "broken"), "gguf_file": "b.gguf"}
        ),
        "model 'TMP/broken': gguf_file 'b.gguf' is not in TMP/broken; its .gguf files: ['a.gguf']",
    ),
    Bad(
        "model-damaged-gguf",
        lambda c: c.train(files={"broken/model.gguf": "not gguf"}, teacher={"model": str(c.tmp / "broken")}),
        "model 'TMP/broken' cannot be loaded (local folder TMP/broken): TMP/broken/model.gguf does not start "
        "with the GGUF magic bytes, so it is not a GGUF file",
    ),
    Bad(
        "model-damaged-config",
        lambda c: _broken_model(c, "config.json", '{"model_type": "llama",'),
        "model 'TMP/broken' cannot be loaded (local folder TMP/broken): It looks like the config file at "
        "'TMP/broken/config.json' is not a valid JSON file",
    ),
    Bad(
        "model-truncated-weights",
        _truncated_teacher,
        "model 'TMP/broken' cannot be loaded: its weight file TMP/broken/model.safetensors is truncated or "
        "damaged: its header promises 677,968 bytes, the file holds 50,000",
    ),
    Bad(
        "model-lora-matches-nothing",
        lambda c: c.train(student={"finetune": "lora", "lora": {"target_modules": ["attn"]}}),
        "student.lora.target_modules: 'attn' names no module of the student (of ['attn']); the student's "
        "linear layers are named down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
    ),
    Bad(
        "model-context-too-short",
        lambda c: c.train(data={"max_length": 1024}),
        "data.max_length=1024 is beyond the context of the teacher copied by student.from_teacher (256 "
        "positions, its max_position_embeddings); set data.max_length to at most 256",
    ),
    Bad(
        "model-missing",
        lambda c: c.train(teacher={"model": str(c.tmp / "none")}),
        "model folder not found: TMP/none",
    ),
    Bad(
        "model-empty-folder",
        lambda c: c.train(teacher={"model": str(c.tmp)}),
        "model 'TMP': folder TMP has neither config.json nor a .gguf file",
    ),
    Bad(
        "model-several-gguf",
        lambda c: c.train(files={"a.gguf": "", "b.gguf": ""}, teacher={"model": str(c.tmp)}),
        "model 'TMP': several .gguf files in TMP; choose one with gguf_file: ['a.gguf', 'b.gguf']",
    ),
    Bad(
        "model-package-missing",
        lambda c: c.train(teacher={"model": "package:no_such_kdistill_pkg"}),
        "model 'package:no_such_kdistill_pkg': Python package 'no_such_kdistill_pkg' is not installed "
        "(pip install it)",
    ),
    Bad(
        "model-too-few-layers",
        lambda c: c.train(student={"from_teacher": {"num_layers": 9}}),
        "student.from_teacher.num_layers=9: the teacher has 4 layers",
    ),
    Bad(
        "model-cannot-shrink",
        _unshrinkable,
        "student.from_teacher: cannot shrink BartForCausalLM: no list of 3 decoder layers found; give "
        "student.model instead",
    ),
    # cache
    Bad(
        "cache-is-a-file",
        _cache_is_a_file,
        "cannot create the cache folder TMP/cache/responses (Not a directory); set KDISTILL_CACHE to a "
        "writable folder",
    ),
    # command line and output folder
    Bad("cli-no-command", lambda c: [], "the following arguments are required: command"),
    Bad(
        "cli-resume-and-overwrite",
        lambda c: c.train("--resume", "--overwrite"),
        "argument --overwrite: not allowed with argument --resume",
    ),
    Bad("cli-unknown-option", lambda c: c.train("--resme"), "unrecognized arguments: --resme"),
    Bad(
        "output-is-a-file",
        lambda c: c.train(files={"out": "x"}),
        "output_dir TMP/out exists and is not a folder",
    ),
    Bad(
        "output-not-empty",
        lambda c: c.train(files={"out/notes.txt": "mine"}),
        "output_dir TMP/out is not empty; pass --resume to continue that run or --overwrite to replace it",
    ),
    Bad("output-read-only", _read_only, _read_only_message()),
    Bad(
        "resume-other-batch-size",
        _resumed_with_other_batch,
        "--resume: this config changes what the run being resumed trains: training.batch_size 4 -> 2 (its "
        "config: TMP/out/checkpoints/step-0000001/kdistill_config.yaml). Resume with its values, add --force "
        "to continue from step 1 with these anyway (config_history.yaml then records both), or --overwrite "
        "to start again",
    ),
]


def _files(folder: Path) -> dict[str, tuple[int, int] | None]:
    # Folders by name only: the write probe in a folder changes its time but leaves nothing in it.
    return {
        str(p): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
    }


@pytest.fixture
def immutable_cleanup(tmp_path: Path):
    yield
    if os.geteuid() == 0 and shutil.which("chattr") and (tmp_path / "out").is_dir():
        subprocess.run(["chattr", "-i", str(tmp_path / "out")], check=False)


@pytest.mark.parametrize("bad", CASES, ids=[b.name for b in CASES])
def test_bad_input(
    bad: Bad,
    tmp_path: Path,
    tiny: dict,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    immutable_cleanup: None,
) -> None:
    monkeypatch.setenv("KDISTILL_CACHE", os.environ["KDISTILL_CACHE"])  # cases may change it; restore it
    argv = bad.setup(Case(tmp_path, tiny))
    capsys.readouterr()
    before = _files(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    err = capsys.readouterr().err
    assert code == bad.code
    marker = next(m for m in ("kdistill: error: ", "kdistill train: error: ") if m in err)
    assert err[err.index(marker) + len(marker) :].rstrip("\n") == bad.message.replace("TMP", str(tmp_path))
    assert _files(tmp_path) == before  # nothing written, nothing half-written


def test_a_malformed_set_value_prints_no_traceback(tmp_path: Path, tiny: dict) -> None:
    """A real process: the message alone on stderr, exit status 2, for a --set value PyYAML cannot parse."""
    config = write_config(tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "out"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    command = [sys.executable, "-m", "kdistill.cli", "validate", str(config), "--set", "training.seed=[1,"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("kdistill: error: --set 'training.seed=[1,': the value '[1,' is not valid")


def test_a_lora_run_prints_no_library_notice(tmp_path: Path, tiny: dict) -> None:
    """DeepSpeed's no-GPU line and peft's deprecation notice do not reach a user's terminal."""
    config = tiny_config(
        tiny, tmp_path / "run", training={"max_steps": 1},
        student={"from_teacher": None, "model": str(tiny["student"]), "finetune": "lora"},
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    env.pop("DS_ACCELERATOR", None)
    done = subprocess.run(
        [sys.executable, "-m", "kdistill", "train", str(write_config(tmp_path / "c.yaml", config))],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Setting accelerator to CPU" not in done.stderr and "FutureWarning" not in done.stderr


@pytest.mark.parametrize("command", ["eval", "bench", "export", "report", "fidelity", "train"])
def test_every_command_on_a_corrupt_run_folder_says_one_line(
    command: str, tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    """The student's weights cut short (a full disk, an interrupted copy) and the metrics log damaged:
    each command names what is wrong in one `kdistill: error:` line and exits 2."""
    config = tiny_config(tiny, tmp_path / "run", training={"max_steps": 2, "save_steps": 1})
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    run = tmp_path / "run"
    for weights in (run / "model.safetensors", *run.glob("checkpoints/*/trainable.safetensors")):
        with open(weights, "r+b") as handle:
            handle.truncate(40_000)
    (run / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')
    capsys.readouterr()
    args = {
        "eval": ["eval", str(run), "--tasks", "none"],
        "bench": ["bench", str(run), "--repeats", "1", "--new-tokens", "2", "--prompt-tokens", "8"],
        "export": ["export", str(run), "--gguf"],
        "report": ["report", str(run)],
        "fidelity": ["fidelity", str(run), "--against", str(run), "--rows", "2"],
        "train": ["train", str(run / "kdistill_config.yaml"), "--resume", "--set", "training.max_steps=3"],
    }[command]
    code = main(args)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdistill")]
    assert code == 2 and len(said) == 1 and said[0].startswith("kdistill: error: "), said
    err = said[0]
    if command == "report":
        assert f"{run / 'metrics.jsonl'}:1: damaged JSON line" in err
    elif command == "train":
        assert "--resume: checkpoint" in err and "trainable.safetensors is truncated or damaged" in err
    else:
        assert f"{run / 'model.safetensors'} is truncated or damaged" in err
        assert "the file holds 40,000" in err
