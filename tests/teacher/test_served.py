"""A teacher served over HTTP: the same top k as in process, the checks before training, a cache built
from servers (and finished after one died), and `kdistill serve` leaving no process behind.

The server is tests/fake_vllm, a stand-in with vLLM's command line and `prompt_logprobs` answers
computed by transformers; tests/test_real_vllm.py runs the real vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.data import Collator, trained_rows
from kdistill.data.tokenize import Tokenized
from kdistill.errors import KdistillError
from kdistill.losses import Sparse
from kdistill.serving.process import ServerProcess, vllm_command
from kdistill.teacher.packing import decode_logprobs
from kdistill.teacher.served import ServerClient, ServerSettings

FAKE = Path(__file__).parents[1] / "fake_vllm"
SRC = Path(__file__).parents[2] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKE), str(SRC)]), **extra}


def start_fake(model: Path, tmp: Path, name: str = "teacher", max_logprobs: int = 20, **env: str):
    """A stand-in server on a free port, as a `ServerProcess` (the caller enters it)."""
    port = free_port()
    command = vllm_command(sys.executable, str(model), name, port, max_logprobs)
    url, log = f"http://127.0.0.1:{port}", tmp / f"server-{port}.log"
    return ServerProcess(command, url, log, timeout=120, env=fake_env(**env))


@pytest.fixture
def served(tiny: dict, tmp_path: Path):
    with start_fake(tiny["teacher"], tmp_path) as server:
        yield server.url


def _batch(tiny: dict) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(tiny["teacher"])
    rows = []
    for i, text in enumerate(["the cat sat on the mat", "a dog ran", "hello there my friend"]):
        ids = tok(text)["input_ids"]
        rows.append(Tokenized(ids, [-100] * 2 + ids[2:], i))
    return Collator(tok.pad_token_id)(rows)


def test_served_top_k_is_the_in_process_top_k(tiny: dict, served: str) -> None:
    batch = _batch(tiny)
    teacher = ServerClient(ServerSettings((served,), "teacher", top_k=8))
    got = teacher.signal(batch)
    model = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = trained_rows(batch["labels"])[0]
    want = Sparse.from_logits(logits[:, :-1][mask], 8)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
    assert got.ids.shape == (int(mask.sum()), 8)


def test_checks_before_training(tiny: dict, served: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny["teacher"])
    rows = [tok("the cat sat")["input_ids"]]
    ServerClient(ServerSettings((served,), "teacher", top_k=8)).check(rows, tok)
    with pytest.raises(
        KdistillError, match="does not serve a model named 'other'; it serves \\['teacher'\\]"
    ):
        ServerClient(ServerSettings((served,), "other", top_k=8)).check(rows, tok)
    with pytest.raises(KdistillError, match="greater than max allowed: 20"):
        ServerClient(ServerSettings((served,), "teacher", top_k=64)).check(rows, tok)

    class Shifted:  # a tokenizer that gives other ids for the same text
        def decode(self, ids: list[int]) -> str:
            return tok.decode(ids)

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
            return {
                "input_ids": [i + 1 for i in tok(text, add_special_tokens=add_special_tokens)["input_ids"]]
            }

    with pytest.raises(KdistillError, match="tokenizes differently from the configured tokenizer"):
        ServerClient(ServerSettings((served,), "teacher", top_k=8)).check(rows, Shifted())
    closed = f"http://127.0.0.1:{free_port()}"
    settings = ServerSettings((closed,), "teacher", top_k=8, retries=1, backoff=0.01)
    with pytest.raises(KdistillError, match=f"server {closed}/v1/models cannot be reached"):
        ServerClient(settings).check(rows, tok)


def test_requests_go_round_robin_and_retry_on_the_next_server(tiny: dict, served: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    batch = _batch(tiny)
    settings = ServerSettings((closed, served), "teacher", top_k=8, retries=2, backoff=0.01)
    alone = ServerClient(ServerSettings((served,), "teacher", top_k=8)).signal(batch)
    both = ServerClient(settings).signal(batch)  # every request to the closed one is retried on the other
    assert torch.equal(both.ids, alone.ids) and torch.equal(both.logprobs, alone.logprobs)


def _cache_config(tiny: dict, tmp: Path, cache: Path, server: str | None) -> Path:
    teacher = {"model": str(tiny["teacher"]), "cache": str(cache), "name": "teacher"}
    if server:
        teacher["server"] = server
    config = tiny_config(
        tiny, tmp / "run", teacher=teacher, cache={"tail_samples": 0, "top_k": 8, "rows_per_shard": 8}
    )
    return write_config(tmp / f"{cache.name}.yaml", config)


def _shards(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    files = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    return {f: load_file(str(folder / f)) for f in files}


def test_cache_from_a_server_matches_the_in_process_cache(tiny: dict, tmp_path: Path, served: str) -> None:
    assert main(["cache", str(_cache_config(tiny, tmp_path, tmp_path / "local", None))]) == 0
    assert main(["cache", str(_cache_config(tiny, tmp_path, tmp_path / "served", served))]) == 0
    local, remote = _shards(tmp_path / "local"), _shards(tmp_path / "served")
    assert local.keys() == remote.keys()
    for name in local:
        # The server scores each row alone and the cache pads a batch, so two log-probs that tie to float
        # rounding may swap places: nearly every position has the same top k in the same order, and every
        # position the same log-probs, rank by rank.
        same = (local[name]["ids"] == remote[name]["ids"]).all(-1)
        assert float(same.float().mean()) >= 0.98
        lp = [decode_logprobs(s[name]["q"], s[name]["top1"], s[name]["step"]) for s in (local, remote)]
        # The same log-probs to float rounding, stored in 8 bits: at most one step of the row's scale apart.
        step = local[name]["step"].float()[:, None]
        assert bool(((lp[1] - lp[0]).abs() <= step + 1e-4).all())
        assert float(((lp[1] - lp[0]).abs() <= 1e-3).float().mean()) >= 0.99
    # A served teacher's cache has no tail samples: asking for them is refused with the reason.
    config = _cache_config(tiny, tmp_path, tmp_path / "samples", served)
    assert main(["cache", str(config), "--set", "cache.tail_samples=4"]) == 2


def test_a_server_dying_mid_cache_loses_nothing(tiny: dict, tmp_path: Path) -> None:
    with start_fake(tiny["teacher"], tmp_path) as server:
        assert main(["cache", str(_cache_config(tiny, tmp_path, tmp_path / "whole", server.url))]) == 0
    partial = tmp_path / "partial"
    with start_fake(tiny["teacher"], tmp_path, FAKE_VLLM_FAIL_AFTER="12") as server:
        config = _cache_config(tiny, tmp_path, partial, server.url)
        assert main(["cache", str(config)]) == 2  # it dies after its 12th answer
    done = json.loads((partial / "manifest.json").read_text())
    assert not done["complete"] and done["splits"]["train"]["shards"]  # whole shards were kept
    with start_fake(tiny["teacher"], tmp_path) as server:
        config = _cache_config(tiny, tmp_path, partial, server.url)
        assert main(["cache", str(config)]) == 0
    whole, finished = _shards(tmp_path / "whole"), _shards(partial)
    assert whole.keys() == finished.keys()
    for name in whole:
        assert all(torch.equal(whole[name][k], finished[name][k]) for k in whole[name])


def _servers_of(port: int) -> list[int]:
    """Pids of processes whose command line serves on `port` (the stand-in's or vLLM's)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"vllm.entrypoints.openai.api_server" in cmdline and str(port).encode() in cmdline:
                found.append(int(proc.name))
    return found


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_its_server_on_a_signal(tiny: dict, tmp_path: Path, stop: signal.Signals) -> None:
    port = free_port()
    teacher = {"model": str(tiny["teacher"]), "server": f"http://127.0.0.1:{port}", "name": "teacher"}
    config = write_config(
        tmp_path / "c.yaml", tiny_config(tiny, tmp_path / "run", teacher=teacher, cache={"top_k": 8})
    )
    command = [sys.executable, "-m", "kdistill.cli", "serve", str(config), "--python", sys.executable]
    process = subprocess.Popen(
        command, env=fake_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        assert f"teacher teacher: served at http://127.0.0.1:{port}" in line, process.stderr.read()
        assert _servers_of(port)
        process.send_signal(stop)
        assert process.wait(timeout=60) == 0
        assert "stopping the servers" in process.stdout.read()
    finally:
        if process.poll() is None:  # the test failed: stop the command and the server it started
            process.kill()
            for pid in _servers_of(port):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _servers_of(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _servers_of(port) == []  # nothing left behind


def test_train_and_validate_with_a_served_teacher(
    tiny: dict, tmp_path: Path, served: str, capsys: pytest.CaptureFixture
) -> None:
    teacher = {"model": str(tiny["teacher"]), "server": served, "name": "teacher"}
    run = tiny_config(tiny, tmp_path / "run", teacher=teacher, cache={"top_k": 8}, training={"max_steps": 2})
    config = write_config(tmp_path / "run.yaml", run)
    assert main(["validate", str(config)]) == 0
    assert (
        f"teacher teacher: served by {served} as 'teacher', top 8 log-probs a position"
        in capsys.readouterr().out
    )
    assert main(["train", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["after"]["kl"] > 0
    # Hidden states cannot come from a server: refused before anything loads.
    hidden = write_config(
        tmp_path / "hidden.yaml", {**run, "loss": {**run["loss"], "hidden": {"weight": 1.0}}}
    )
    assert main(["validate", str(hidden)]) == 2
    assert (
        f"teacher 'teacher' is served ({served}): a server gives top-k log-probs" in capsys.readouterr().err
    )
