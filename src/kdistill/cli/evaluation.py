"""`kdistill eval`, `bench`, `fidelity` and `report`: what the student kept, how fast it is, how far a
quantized teacher is from its reference, and the run report. Parsing and printing only."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdistill.files import RunFiles


def add_eval_commands(commands: argparse._SubParsersAction) -> None:
    """`eval`, `bench`, `fidelity`, `export` and `report`: what the student kept, how fast it is, how far
    a quantized teacher is, the student as GGUF, and the run report."""
    target_help = "a run folder (its teacher and held-out rows come from its config) or any model"
    text = "Held-out quality and benchmarks of a student against its teacher; writes eval.json."
    ev = commands.add_parser("eval", help=text, description=text)
    ev.add_argument("target", help=target_help)
    ev.add_argument("--teacher", help="teacher model (default: the run's teacher)")
    ev.add_argument("--validation", help="held-out data file (default: the run's held-out rows)")
    ev.add_argument(
        "--data-dir",
        help="folder of benchmark files (default: $KDISTILL_EVAL_DATA, else lm-eval's own tasks when online; "
        "without either the benchmarks are skipped, saying how to get the data)",
    )
    ev.add_argument("--tasks", default="all", help="comma-separated benchmark tasks, 'all' or 'none'")
    ev.add_argument("--limit", type=_limit, default=200, help="items per task, or 'all' (default 200)")
    ev.add_argument("--num-fewshot", type=int, help="few-shot examples per benchmark prompt (default 0)")
    ev.add_argument("--rows", type=int, help="held-out rows for perplexity, KL and top-1 (default all)")
    ev.add_argument("--rouge-rows", type=int, default=32, help="held-out rows generated for ROUGE-L")
    ev.add_argument("--generations", type=int, default=3, help="generations shown side by side")
    ev.add_argument("--max-new-tokens", type=int, default=128, help="longest generation, in tokens")
    ev.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    ev.add_argument("--output", help="where to write eval.json (default: inside the run folder)")
    ev.add_argument(
        "--teacher-scores",
        metavar="EVAL_JSON",
        help="take the teacher's benchmark scores from this earlier eval.json (same --data-dir, --limit and "
        "--num-fewshot) instead of measuring them again",
    )
    text = "Parameters, size, peak memory and tokens/s of teacher and student; writes bench.json."
    bench = commands.add_parser("bench", help=text, description=text)
    bench.add_argument("target", help=target_help)
    bench.add_argument("--teacher", help="teacher model (default: the run's teacher)")
    bench.add_argument("--prompt-tokens", type=int, default=256, help="prompt length (default 256)")
    bench.add_argument("--new-tokens", type=int, default=64, help="tokens generated (default 64)")
    bench.add_argument("--batch-size", type=int, default=1, help="sequences at once (default 1)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs, median taken (default 3)")
    bench.add_argument("--output", help="where to write bench.json (default: inside the run folder)")
    _fidelity_command(commands)
    _export_command(commands)
    text = "Write report.md and report.html (config, loss curves, eval and bench tables) into RUN_DIR."
    commands.add_parser("report", help=text, description=text).add_argument("run_dir", help="a run folder")


def _fidelity_command(commands: argparse._SubParsersAction) -> None:
    text = (
        "How far a quantized teacher is from its reference on held-out rows: KL(reference || quantized) "
        "per token, top-1 agreement, top-k overlap and the perplexity of each."
    )
    fid = commands.add_parser("fidelity", help=text, description=text)
    fid.add_argument(
        "target",
        help="the reference: a run config or run folder (its first teacher in full precision and its "
        "held-out rows) or a model (package:NAME, folder, hub id)",
    )
    fid.add_argument(
        "--against",
        action="append",
        metavar="4bit|8bit|MODEL",
        help="what to compare with the reference (repeatable): 4bit (bitsandbytes NF4), 8bit "
        "(LLM.int8), or another model of the same tokenizer (default: 4bit and 8bit)",
    )
    fid.add_argument("--validation", help="held-out data file (default: the run's held-out rows)")
    fid.add_argument("--rows", type=_limit, default=64, help="held-out rows, or 'all' (default 64)")
    fid.add_argument("--top-k", type=_positive, default=10, help="k of the top-k overlap (default 10)")
    fid.add_argument("--batch-size", type=_positive, default=8, help="rows per forward pass (default 8)")
    fid.add_argument("--max-length", type=_positive, help="tokens per row (default: the run's, else 512)")
    fid.add_argument("--output", help="also write the result as JSON to this file")


def _export_command(commands: argparse._SubParsersAction) -> None:
    text = (
        "Write a run's student (a LoRA adapter merged into its base) as a GGUF file that llama.cpp, "
        "Ollama and LM Studio load (llama, mistral, qwen2, qwen3 and gemma3 architectures)."
    )
    export = commands.add_parser("export", help=text, description=text)
    export.add_argument("target", help="a run folder, or a model folder")
    export.add_argument("--gguf", action="store_true", required=True, help="write GGUF (the one format)")
    export.add_argument(
        "--type", default="f32", choices=["f32", "f16", "q8_0"], help="how matrices are stored (default f32)"
    )
    export.add_argument("--output", help="the .gguf file to write (default: RUN/student-TYPE.gguf)")


def _limit(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of items or 'all', got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _eval(args: argparse.Namespace) -> int:
    from kdistill.api import evaluate
    from kdistill.eval.tables import eval_table, text_table

    result = evaluate(
        args.target, teacher=args.teacher, validation=args.validation, tasks=args.tasks,
        data_dir=args.data_dir, limit=args.limit, rows=args.rows, rouge_rows=args.rouge_rows,
        generations=args.generations, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        num_fewshot=args.num_fewshot, output=args.output, teacher_scores=args.teacher_scores,
    )  # fmt: skip
    for shown in result.get("generations", []):
        print(f"\n### {shown['prompt'][:300]}")
        for who in ("reference", "student", "teacher"):
            if who in shown:
                print(f"--- {who}: {shown[who][:400]}")
    print("\n" + text_table(eval_table(result)))
    if "written_to" in result:
        print(f"\nwritten to {result['written_to']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from kdistill.api import export

    path = export(args.target, gguf_type=args.type, output=args.output)
    print(f"GGUF ({args.type}) written to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from kdistill.eval.bench import BenchSettings, bench
    from kdistill.eval.load import run_folder
    from kdistill.eval.runner import write_json
    from kdistill.eval.tables import bench_table, text_table

    settings = BenchSettings(args.prompt_tokens, args.new_tokens, args.batch_size, args.repeats)
    result = bench(args.target, args.teacher, settings)
    print(text_table(bench_table(result)))
    run_dir = run_folder(args.target)
    output = args.output or (run_dir / RunFiles.BENCH if run_dir else None)
    if output:
        write_json(result, Path(output))
        print(f"\nwritten to {output}")
    return 0


def _fidelity(args: argparse.Namespace) -> int:
    from kdistill.eval.fidelity import FidelitySettings, fidelity_table, teacher_fidelity
    from kdistill.eval.load import load_fidelity_inputs
    from kdistill.eval.runner import write_json
    from kdistill.eval.tables import text_table

    inputs = load_fidelity_inputs(args.target, args.against or ["4bit", "8bit"], args.validation)
    settings = FidelitySettings(args.rows, args.top_k, args.batch_size, args.max_length or inputs.max_length)
    result = teacher_fidelity(inputs.reference, inputs.others, inputs.validation, inputs.tokenizer, settings)
    result["validation"] = inputs.validation_source
    print(f"\nreference: {inputs.reference.label} ({inputs.reference.description})")
    print(f"{result['rows']} held-out rows from {inputs.validation_source}, {result['tokens']:,.0f} tokens\n")
    print(text_table(fidelity_table(result)))
    if args.output:
        write_json(result, Path(args.output))
        print(f"\nwritten to {args.output}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from kdistill.eval.report import write_report

    print(f"report written to {write_report(args.run_dir)} and report.md beside it")
    return 0


HANDLERS = {"eval": _eval, "bench": _bench, "fidelity": _fidelity, "report": _report, "export": _export}
