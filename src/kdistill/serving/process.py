"""A vLLM server kdistill starts: its command line, its process, waiting until it answers, and stopping it.

vLLM lives in its own Python environment (`make vllm-env` creates `.venv-vllm`): it pins its own torch
and transformers. The server runs in a new process group, so stopping it stops every process it
started; it is stopped on exit, on an error and on SIGINT/SIGTERM (`ServerProcess` is a context
manager, and the CLI turns both signals into a normal exit). On Linux the server is also sent SIGTERM
when kdistill dies without cleaning up (SIGKILL, a crash): the kernel's parent-death signal.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from tqdm.auto import tqdm

from kdistill.errors import KdistillError

log = logging.getLogger("kdistill")

DEFAULT_PYTHON = ".venv-vllm/bin/python"


def vllm_command(
    python: str,
    model: str,
    name: str,
    port: int,
    max_logprobs: int,
    memory: float | None = None,
    max_length: int | None = None,
    dtype: str = "float32",
) -> list[str]:
    """The server's command line: vLLM's OpenAI-compatible server on `port`, fp32 on CPU.

    `memory` is the share of the device's memory vLLM reserves (`--gpu-memory-utilization`; on its CPU
    backend, of the machine's memory), None for vLLM's default. `max_length` caps the sequences it
    serves (`--max-model-len`): its KV cache is sized for them, not for the model's whole context.
    `dtype` is the weights' dtype there (float32 on CPU, where bf16 matmuls are slow).
    """
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", name,
        "--max-logprobs", str(max_logprobs), "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    if memory is not None:
        command += ["--gpu-memory-utilization", str(memory)]
    return command if max_length is None else [*command, "--max-model-len", str(max_length)]


def local_port(url: str) -> int:
    """The port of a URL on this machine; a served teacher elsewhere is not kdistill's to start."""
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1") or parsed.port is None:
        raise KdistillError(
            f"teacher.server {url}: `kdistill serve` starts servers on this machine only "
            "(http://127.0.0.1:PORT); a server elsewhere is started by whoever runs it"
        )
    return parsed.port


class ServerProcess:
    """One server process: `with ServerProcess(command, url, log_file):` starts it, waits for
    `url/health`, and always stops it (and the processes it started) on the way out."""

    def __init__(
        self,
        command: list[str],
        url: str,
        log_file: Path,
        timeout: float = 900.0,
        env: dict | None = None,
        what: str = "serving",
        cpus: set[int] | None = None,
    ) -> None:
        self.command, self.url, self.log_file, self.timeout = command, url.rstrip("/"), log_file, timeout
        self.env = env  # the server's environment; None: this process's
        self.what = what  # what the progress bar calls the server
        self.cpus = cpus  # the CPU cores the server's processes run on; None: this process's
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        if not Path(self.command[0]).exists():
            raise KdistillError(
                f"no Python at {self.command[0]} to run the server with; create vLLM's environment with "
                "`make vllm-env`, or give --python"
            )
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
                preexec_fn=_dies_with(os.getpid(), self.cpus),
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        started = time.monotonic()
        bar = tqdm(desc=f"{self.what}: starting {self.url}", bar_format="{desc} {elapsed}", mininterval=10)
        with bar:
            while time.monotonic() - started < self.timeout:
                if self.process.poll() is not None:
                    text = self.log_file.read_text(errors="replace")
                    raise KdistillError(
                        f"the server exited ({self.process.returncode}) while starting{_first_error(text)}; "
                        f"the end of its log ({self.log_file}):\n{text[-1500:]}"
                    )
                if _answers(self.url + "/health"):
                    return
                time.sleep(1.0)
                bar.update(1)
        raise KdistillError(
            f"the server at {self.url} did not answer within {self.timeout:.0f} s; see {self.log_file}"
        )

    def stop(self) -> None:
        """SIGTERM to the server's process group; after 20 s, SIGKILL to whatever of it is left."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=20.0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # workers the server started, if any outlived it
        self.process.wait()


def _dies_with(parent: int, cpus: set[int] | None = None) -> Callable[[], None] | None:
    """What the server's process runs before the server (Linux): SIGTERM to it when `parent` dies,
    and, with `cpus`, its CPU affinity (inherited by the processes it starts).

    The kernel sends the signal when the thread that started the server ends, so servers are started
    from the main thread. `prctl` is looked up here, in kdistill's process: the child only calls it.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def in_child() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:  # kdistill died before the signal was set
            os._exit(1)

    return in_child


def _first_error(log: str) -> str:
    """`: EXCEPTION: MESSAGE`, why a server failed to start: the first exception line logged at ERROR
    level (vLLM's `ValueError: ...`; its traceback ends on a wrapper), else the log's last exception
    line; empty when the log has none."""
    found = [
        (" ERROR " in line, m)
        for line in log.splitlines()
        if (m := re.search(r"\b([A-Z]\w*(Error|Exception)): (.+)", line))
    ]
    if not found:
        return ""
    _, match = next((f for f in found if f[0]), found[-1])
    return f": {match.group(1)}: {match.group(3)[:300]}"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False
