"""A served teacher whose server fails: the start-up check retries, retries are counted (metrics and the
progress bar), the final error names the retries and URLs and says what is kept, and a run that failed
before its first checkpoint leaves a folder the next plain `train` takes over.

The server is a proxy in a thread in front of the tests/fake_vllm stand-in: it answers 500 on every
request, on every second one, or passes each on. tests/serving/test_real_vllm_outage.py kills and
restarts a real vLLM server.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import tiny_config, write_config
from kdistill.cli import main
from kdistill.errors import ServerUnreachable
from kdistill.run.loop import _postfix
from kdistill.teacher.served import ServerClient, ServerSettings
from teacher.test_served import start_fake


class Faulty(ThreadingHTTPServer):
    """Passes requests on to `upstream`, except those its `mode` fails with a 500: `always`, `every
    second` (the 2nd, 4th, ...) or `never` (or a function that says which, asked at each request);
    counts what it saw and failed."""

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream, self.mode, self.seen, self.failed = upstream, "never", 0, 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fails(self) -> bool:
        mode = self.mode() if callable(self.mode) else self.mode
        with self.lock:
            self.seen += 1
            fail = mode == "always" or (mode == "every second" and self.seen % 2 == 0)
            self.failed += fail
            return fail


class _Handler(BaseHTTPRequestHandler):
    server: Faulty

    def do_GET(self) -> None:
        self._answer(None)

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers["Content-Length"])))

    def _answer(self, body: bytes | None) -> None:
        if self.server.fails():
            self._send(500, b'{"error": "internal server error"}')
            return
        request = urllib.request.Request(
            self.server.upstream + self.path, data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                self._send(answer.status, answer.read())
        except urllib.error.HTTPError as err:
            self._send(err.code, err.read())

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:  # keep the test output to the test's own
        pass


@pytest.fixture(scope="module")
def upstream(tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with start_fake(tiny["teacher"], tmp_path_factory.mktemp("fake")) as server:
        yield server.url


@pytest.fixture
def faulty(upstream: str) -> Iterator[Faulty]:
    server = Faulty(upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _rows(tiny: dict) -> tuple[list[list[int]], object]:
    tok = AutoTokenizer.from_pretrained(tiny["teacher"])
    return [tok("the cat sat on the mat")["input_ids"]], tok


def test_the_start_up_check_retries_server_errors(tiny: dict, faulty: Faulty) -> None:
    rows, tok = _rows(tiny)
    faulty.mode = "every second"
    client = ServerClient(ServerSettings((faulty.url,), "teacher", top_k=8, retries=2, backoff=0.01))
    client.check(rows, tok)  # every request it makes fails once at most, and is retried
    assert faulty.failed >= 1 and client.retries == faulty.failed
    # A 4xx answer is the request's fault: it is not retried.
    wrong = ServerClient(ServerSettings((faulty.url,), "teacher", top_k=64, retries=2, backoff=0.01))
    faulty.mode, faulty.failed = "never", 0
    with pytest.raises(Exception, match="greater than max allowed: 20"):
        wrong.check(rows, tok)
    assert wrong.retries == 0


def test_the_final_error_names_the_retries_and_urls(tiny: dict, faulty: Faulty) -> None:
    rows, tok = _rows(tiny)
    faulty.mode = "always"
    client = ServerClient(ServerSettings((faulty.url,), "teacher", top_k=8, retries=3, backoff=0.01))
    with pytest.raises(ServerUnreachable) as caught:
        client.check(rows, tok)
    assert str(caught.value).startswith(f"server {faulty.url}/v1/models answered 500: ")
    assert re.search(
        f"gave up after 3 retries over 0\\.[0-9] s against {faulty.url} \\(3 retries", str(caught.value)
    )
    assert "raise teacher.retries" in str(caught.value)
    assert faulty.failed == 4 and client.retries == 3


def _train_config(tiny: dict, tmp: Path, url: str, **training: int) -> Path:
    teacher = {"model": str(tiny["teacher"]), "server": url, "name": "teacher", "retries": 5}
    teacher["retry_backoff"] = 0.01
    run = tiny_config(
        tiny, tmp / "run", teacher=teacher, cache={"top_k": 8}, training={"max_steps": 3, **training}
    )
    return write_config(tmp / "run.yaml", run)


def test_training_counts_its_retries(
    tiny: dict, tmp_path: Path, faulty: Faulty, capsys: pytest.CaptureFixture
) -> None:
    faulty.mode = "every second"
    assert main(["train", str(_train_config(tiny, tmp_path, faulty.url))]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # Each step's requests (4 rows) and the held-out check's before it: every second one failed once.
    assert all(r["teacher/retries"] >= 1 for r in steps)
    assert sum(r["teacher/retries"] for r in steps) <= faulty.failed
    assert "retries=" in capsys.readouterr().err  # on the progress bar
    assert _postfix(steps[-1], 7)["retries"] == "7" and "retries" not in _postfix(steps[-1], 0)


def test_a_run_whose_server_always_fails_leaves_a_folder_the_next_run_takes_over(
    tiny: dict,
    tmp_path: Path,
    faulty: Faulty,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kdistill")
    config, out = _train_config(tiny, tmp_path, faulty.url), tmp_path / "run"
    faulty.mode = "always"  # the start-up check fails: nothing is written
    assert main(["train", str(config)]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"kdistill: error: server {faulty.url}/v1/models answered 500: ")
    assert re.search(f"gave up after 5 retries over 0\\.[0-9] s against {faulty.url} ", line)
    assert not out.exists()
    # Down once the run folder is written, after the start-up check: every request after it fails.
    faulty.mode = lambda: "always" if (out / "kdistill_config.yaml").is_file() else "never"
    assert main(["train", str(config)]) == 2
    line = _error_line(capsys)
    assert 'answered 500: {"error": "internal server error"}; gave up after 5 retries' in line
    assert line.endswith(
        "No checkpoint was saved before it, so no step is kept: make sure the teacher's server answers, "
        "then run the same `kdistill train` command again (it takes this folder over)"
    ), line
    assert not (out / "checkpoints").is_dir() or not any((out / "checkpoints").iterdir())
    faulty.mode = "never"
    assert main(["train", str(config)]) == 0  # a plain `train` takes the folder over
    assert "no step of the run that left it was saved; starting it afresh" in caplog.text
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def _error_line(capsys: pytest.CaptureFixture) -> str:
    return next(x for x in capsys.readouterr().err.splitlines() if x.startswith("kdistill: error:"))


def test_a_server_failing_mid_run_says_what_is_kept(
    tiny: dict, tmp_path: Path, faulty: Faulty, capsys: pytest.CaptureFixture
) -> None:
    config = _train_config(tiny, tmp_path, faulty.url, save_steps=1)
    second = tmp_path / "run" / "checkpoints" / "step-0000002"
    faulty.mode = lambda: "always" if second.is_dir() else "never"  # down once step 2 is saved
    assert main(["train", str(config)]) == 2
    line = _error_line(capsys)
    assert "answered 500" in line and re.search(
        f"gave up after 5 retries over 0\\.[0-9] s against {faulty.url} ", line
    )
    assert line.endswith(
        f"The previous checkpoint {second} is intact: make sure the teacher's server answers, then continue "
        "from it with --resume"
    ), line
    faulty.mode = "never"
    assert main(["train", str(config), "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3


def test_a_cache_build_retries_and_keeps_its_shards_when_the_server_stays_down(
    tiny: dict, tmp_path: Path, faulty: Faulty, capsys: pytest.CaptureFixture
) -> None:
    cache = tmp_path / "cache"
    teacher = {"model": str(tiny["teacher"]), "server": faulty.url, "name": "teacher", "cache": str(cache)}
    teacher.update(retries=5, retry_backoff=0.01)
    run = tiny_config(
        tiny, tmp_path / "run", teacher=teacher, cache={"tail_samples": 0, "top_k": 8, "rows_per_shard": 8}
    )
    config = write_config(tmp_path / "cache.yaml", run)
    manifest = cache / "manifest.json"

    def written() -> int:  # the train shards the manifest records
        return len(json.loads(manifest.read_text())["splits"]["train"]["shards"]) if manifest.is_file() else 0

    faulty.mode = lambda: "always" if written() >= 2 else "never"  # down after two shards
    assert main(["cache", str(config)]) == 2
    line = _error_line(capsys)
    assert re.search(
        f"answered 500: .*; gave up after 5 retries over 0\\.[0-9] s against {faulty.url} ", line
    )
    assert line.endswith(
        "The 2 shards written before it are kept: make sure the teacher's server answers, then run the same "
        "`kdistill cache` command to write the rest"
    ), line
    faulty.mode = "every second"  # back, failing every second request: the build retries them and ends
    assert main(["cache", str(config)]) == 0
    assert json.loads(manifest.read_text())["complete"] and faulty.failed > 6
    assert "retries=" in capsys.readouterr().err  # on the progress bar
