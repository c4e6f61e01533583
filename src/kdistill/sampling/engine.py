"""The student's generation engine for on-policy steps: a vLLM server that holds the student's weights.

kdistill writes the student into the run folder (`engine/`), starts vLLM on it (or uses a server the user
started), and every `sync_steps` optimizer steps brings the engine up to the current weights:

- a LoRA student: its adapter is saved to a new folder and loaded under a new name
  (`/v1/load_lora_adapter`, which needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING`); the old one is unloaded;
- a full student: its weights are copied over those of the served folder's file (`engine_weights.py`),
  and the engine reloads them in place (`/collective_rpc` `reload_weights`, a development endpoint of
  `VLLM_SERVER_DEV_MODE`), then drops its prefix cache, which holds keys and values of the old weights.

vLLM's in-place reload does not reload an output head tied to the embedding (it keeps the head it
started with), so a tied student is served untied (`--hf-overrides`) with the head written out.

Each row is one `/v1/completions` request with the prompt's token ids and its own seed; the answer's
`token_ids` are the sampled tokens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from kdistill.errors import KdistillError
from kdistill.sampling.engine_memory import kv_cache_bytes, shape_of_student
from kdistill.sampling.engine_weights import write_base, write_weights
from kdistill.sampling.generate import Sampling, responses, row_seed
from kdistill.serving.http import http_json
from kdistill.serving.process import ServerProcess, vllm_command

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's --max-lora-rank accepts


@dataclass(frozen=True)
class EngineSettings:
    """Where the engine runs and how often it is synced (plain values from `training.on_policy`)."""

    python: str
    server: str | None  # a running server's URL; None: kdistill starts one
    served_name: str
    memory: float | None  # the share of the device vLLM reserves; None: a KV cache sized for `rows`
    start_timeout: float
    sync_steps: int
    max_model_len: int
    overlap: bool = False  # sample the next step's rows while this step trains (sampling/overlap.py)
    devices: str | None = None  # where a server kdistill starts runs: GPUs, or CPU cores ("1", "2-3")
    concurrency: int = 32  # requests in flight
    timeout: float = 600.0  # seconds for one request
    rows: int = 1  # rows a step samples on one training process (the KV cache holds every process's)


class VllmEngine:
    """`with VllmEngine(...) as engine:` writes the student, starts vLLM on it and waits for it; the
    server is stopped on the way out, however the block ends.

    With several training processes (`processes`: the run's accelerator), the main process writes the
    weights, starts, syncs and stops the one server; every process samples its own rows from it, each
    once the sync before its step has finished (a barrier).
    """

    def __init__(
        self,
        settings: EngineSettings,
        folder: Path,
        student: Any,
        tokenizer: Any,
        step: int,
        processes: Any = None,
    ) -> None:
        self.settings, self.folder, self.tokenizer = settings, folder, tokenizer
        self.lora = hasattr(student, "peft_config")
        self.synced = step  # the optimizer step whose weights the engine holds
        self.model = settings.served_name  # the name requests ask for (a LoRA student: its adapter's)
        self.url = settings.server or f"http://127.0.0.1:{_free_port()}"
        self.server: ServerProcess | None = None
        self.processes = processes if processes is not None and processes.num_processes > 1 else None
        self.main = self.processes is None or self.processes.is_main_process
        self._student = student

    def __enter__(self) -> VllmEngine:
        with _sigterm_interrupts():  # a SIGTERM while it starts still stops it
            try:
                self._start()
            except BaseException:
                self.__exit__()
                raise
        return self

    def _start(self) -> None:
        """Write the student, start the server (unless one runs) and wait for it; check what it serves."""
        if self.main:
            self.folder.mkdir(parents=True, exist_ok=True)
            base = self.folder / "student"
            tied = write_base(self._student, self.tokenizer, base, self.lora)
            if self.settings.server is None:
                command, log_file = self._command(base, tied), self.folder / "server.log"
                timeout, env, cores = self.settings.start_timeout, self._environment(), self._placement()[1]
                args = (command, self.url, log_file, timeout, env, "student engine", set(cores) or None)
                self.server = ServerProcess(*args)
                self.server.__enter__()
            self._check_served()
        if self.processes is not None:  # the main process's server, for every process
            self.url = broadcast_object_list([self.url], from_process=0)[0]
        if self.lora or self.settings.server is not None:
            self.sync(self._student, self.synced)  # the adapter; a running server holds other weights
        elif self.processes is not None:
            self.processes.wait_for_everyone()

    def __exit__(self, *exc: object) -> None:
        """Stop the server kdistill started, and remove the weights written for the engine (its log stays)."""
        if self.server is not None:
            self.server.stop()
        if not self.main:
            return
        for item in self.folder.iterdir() if self.folder.is_dir() else []:
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)

    def staleness(self, step: int) -> int:
        """Optimizer steps between the weights of step `step` (trained up to step - 1) and the engine's."""
        return step - 1 - self.synced

    def maybe_sync(self, student: Any, step: int) -> None:
        """Before step `step` generates: sync when the engine's weights are `sync_steps` steps old."""
        if self.staleness(step) >= self.settings.sync_steps:
            self.sync(student, step - 1)

    def sync(self, student: Any, weights_step: int) -> None:
        """Bring the engine to `student`'s current weights, those after optimizer step `weights_step`
        (on the main process; every process then names the new adapter and waits for the sync)."""
        old = self.model
        if self.lora:
            self.model = f"{self.settings.served_name}-{weights_step}"
        if self.main and self.lora:
            adapter = self.folder / f"adapter-{weights_step}"
            shutil.rmtree(adapter, ignore_errors=True)
            student.save_pretrained(adapter)
            body = {"lora_name": self.model, "lora_path": str(adapter.resolve())}
            self._post("/v1/load_lora_adapter", body)
            if old != self.settings.served_name and old != self.model:
                self._post("/v1/unload_lora_adapter", {"lora_name": old})
                shutil.rmtree(self.folder / f"adapter-{old.rsplit('-', 1)[1]}", ignore_errors=True)
        elif self.main:
            base = self.folder / "student"
            write_weights(student, base)
            self._post(
                "/collective_rpc",
                {"method": "reload_weights", "kwargs": {"weights_path": str(base.resolve())}},
            )
            self._post("/reset_prefix_cache", {})
        self.synced = weights_step
        if self.processes is not None:
            self.processes.wait_for_everyone()

    def sample(
        self, batches: Sequence[list[list[int]]], sampling: Sampling, seeds: Sequence[int]
    ) -> list[list[list[int]]]:
        """Each batch's responses to its prompts (token ids), all rows in flight together; row r of a
        batch with seed s samples with seed `row_seed(s, r)`."""
        jobs = [
            (b, r, ids, row_seed(seed, r))
            for b, (rows, seed) in enumerate(zip(batches, seeds))
            for r, ids in enumerate(rows)
        ]
        with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
            answers = list(pool.map(lambda job: self._complete(job[2], sampling, job[3]), jobs))
        out: list[list[list[int]]] = [[] for _ in batches]
        for (b, _, _, _), ids in zip(jobs, answers):
            out[b].append(ids)
        return out

    def _complete(self, ids: list[int], sampling: Sampling, seed: int) -> list[int]:
        body = {
            "model": self.model, "prompt": ids, "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0, "min_p": 0.0,
            "repetition_penalty": 1.0, "seed": seed, "stop_token_ids": [sampling.eos_token_id],
            "return_token_ids": True,
        }  # fmt: skip
        answer = self._post("/v1/completions", body)
        try:
            choice = answer["choices"][0]
            tokens = list(choice["token_ids"])
        except (KeyError, IndexError, TypeError):
            raise KdistillError(
                f"the student's engine at {self.url} gave no token_ids (vLLM's `return_token_ids`); it "
                f"answered {str(answer)[:200]}"
            ) from None
        if choice.get("finish_reason") == "stop" and (not tokens or tokens[-1] != sampling.eos_token_id):
            tokens.append(sampling.eos_token_id)  # an engine that leaves the stop token out
        return responses(torch.tensor([tokens]), sampling.eos_token_id)[0] if tokens else []

    def _post(self, path: str, body: dict) -> Any:
        """One request to the engine; the adapter endpoints answer plain text, the others JSON."""
        text = path.endswith("_lora_adapter")
        return http_json(self.url + path, body, self.settings.timeout, text=text)

    def _command(self, base: Path, tied: bool) -> list[str]:
        dtype = str(next(self._student.parameters()).dtype).removeprefix("torch.")
        s, port = self.settings, int(self.url.rsplit(":", 1)[1])
        args = (s.python, str(base.resolve()), s.served_name, port, 1, s.memory, s.max_model_len, dtype)
        command = vllm_command(*args)
        if s.memory is None:
            command += ["--kv-cache-memory-bytes", str(self.kv_cache_bytes(tied))]
        command += ["--generation-config", "vllm"]  # no sampling defaults from the model's folder
        gpus, _ = self._placement()
        if len(gpus) > 1:
            command += ["--tensor-parallel-size", str(len(gpus))]
        if self.lora:
            rank = max(c.r for c in self._student.peft_config.values())
            command += ["--enable-lora", "--max-lora-rank", str(_lora_rank(rank)), "--max-cpu-loras", "2"]
        elif tied:
            command += ["--hf-overrides", '{"tie_word_embeddings": false}']
        return command

    def kv_cache_bytes(self, tied: bool) -> int:
        """The KV cache the engine is given: every process's rows in flight at the longest sequence."""
        s, count = self.settings, self.processes.num_processes if self.processes is not None else 1
        shape = shape_of_student(self._student, tied)
        return kv_cache_bytes(shape, min(s.rows * count, s.concurrency), s.max_model_len)

    def _environment(self) -> dict[str, str]:
        extra = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if self.lora else {"VLLM_SERVER_DEV_MODE": "1"}
        gpus, cores = self._placement()
        if gpus:
            extra["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        if cores:
            extra["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
        sized = self.settings.memory is None  # the env var would override the plan's size
        inherited = {k: v for k, v in os.environ.items() if not (sized and k == "VLLM_CPU_KVCACHE_SPACE")}
        return {**inherited, **extra}

    def _placement(self) -> tuple[list[int], list[int]]:
        """`devices` as `(GPUs, CPU cores)` of the server kdistill starts: GPUs with CUDA, cores on
        vLLM's CPU build; empty: the training process's."""
        ids = _device_ids(self.settings.devices)
        return (ids, []) if torch.cuda.is_available() else ([], ids)

    def _check_served(self) -> None:
        answer = http_json(self.url + "/v1/models", None, 30.0)
        served = [m.get("id") for m in answer.get("data", [])]
        if self.settings.served_name not in served:
            raise KdistillError(
                f"the student's engine at {self.url} does not serve a model named "
                f"{self.settings.served_name!r}; it serves {served}. "
                "Set training.on_policy.engine.served_name"
            )


def _device_ids(devices: str | None) -> list[int]:
    """'1', '2,3' or '4-7' as device numbers."""
    ids: list[int] = []
    for part in devices.split(",") if devices else []:
        first, _, last = part.partition("-")
        ids += range(int(first), int(last or first) + 1)
    return ids


def _lora_rank(r: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds rank `r`."""
    for rank in LORA_RANKS:
        if rank >= r:
            return rank
    raise KdistillError(f"student.lora.r={r}: vLLM serves LoRA ranks up to {LORA_RANKS[-1]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt in the block (on the main thread), as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
