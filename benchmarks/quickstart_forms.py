"""The whole CPU quickstart with its teacher in fp32, compact and NF4, and with gradient checkpointing.

    python benchmarks/quickstart_forms.py [--forms fp32,compact,nf4,checkpointing] [--steps N] [--json]

Each form is `kdistill train` on `configs/quickstart.yaml` (or `configs/quickstart-4bit.yaml` for
`nf4`) in a fresh process, one after the other in one invocation: wall time of the whole command
(loading, the held-out evaluation before and after, export), the time of the training steps alone
(the sum of the steps' times from `metrics.jsonl`), the process's peak resident memory (`os.wait4`),
and the held-out KL and perplexity of `summary.json`; each beside fp32 as a ratio. `nf4` needs
bitsandbytes (`pip install 'kdistill[quant]'`). Pin it to one core for repeatable figures, for example
`OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/quickstart_forms.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cache_speed import machine  # noqa: E402
from train_memory import run as run_train  # noqa: E402

FORMS = {
    "fp32": ("quickstart.yaml", {}),
    "compact": ("quickstart.yaml", {"teacher": {"compact": True}}),
    "nf4": ("quickstart-4bit.yaml", {}),
    "checkpointing": ("quickstart.yaml", {"training": {"gradient_checkpointing": True}}),
}


def config(form: str, folder: Path, steps: int | None) -> dict:
    name, changes = FORMS[form]
    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
    for section, values in changes.items():
        cfg[section] = {**cfg[section], **values}
    if steps:
        cfg["training"]["max_steps"] = steps
    cfg["output_dir"] = str(folder / form)
    return cfg


def measure(form: str, folder: Path, steps: int | None) -> dict:
    cfg = config(form, folder, steps)
    (folder / form).mkdir(parents=True)
    row = run_train(cfg, folder / form)
    records = [json.loads(x) for x in (folder / form / "metrics.jsonl").read_text().splitlines()]
    # tokens_per_s is per logging window: its trained tokens over its steps' time.
    step_s = sum(r["trained_tokens"] / r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    summary = json.loads((folder / form / "summary.json").read_text())
    after = summary["after"]
    return {"form": form, **row, "steps_s": step_s, "kl": after["kl"], "ppl": after["ppl"]}


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        f"| form | wall s | ×{base['form']} | steps s | ×{base['form']} | peak RSS MB | ×{base['form']} "
        "| held-out KL | perplexity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratios = [r[k] / base[k] for k in ("wall_s", "steps_s", "peak_rss_mb")]
        lines.append(
            f"| {r['form']} | {r['wall_s']:.0f} | {ratios[0]:.2f} | {r['steps_s']:.0f} | {ratios[1]:.2f} "
            f"| {r['peak_rss_mb']:.0f} | {ratios[2]:.2f} | {r['kl']:.4f} | {r['ppl']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", default=",".join(FORMS), help="comma-separated, the first is the base")
    parser.add_argument("--steps", type=int, help="stop after N steps (default: the whole quickstart)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        for form in args.forms.split(","):
            rows.append(measure(form, Path(tmp), args.steps))
            print(f"{form}: {rows[-1]['wall_s']:.0f} s", file=sys.stderr)
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"machine: {machine()}; OMP_NUM_THREADS={threads}; affinity {sorted(os.sched_getaffinity(0))}")
    print(table(rows))
    print(f"total {(time.perf_counter() - started) / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(), "threads": threads, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
