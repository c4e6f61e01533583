"""`kdistill` command line: parsing and printing only; the work happens in the packages."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from kdistill.errors import KdistillError
from kdistill.files import RunFiles

EPILOG = (
    "Configs: see configs/quickstart.yaml and the README. Any key can be overridden with --set a.b=value."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdistill", description="Knowledge distillation of language models.", epilog=EPILOG
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        sub.add_argument("config", help="run config, YAML or JSON")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set training.learning_rate=1e-5 (repeatable)",
        )
        return sub

    train = with_config("train", "Distil the student described by CONFIG into its output_dir.")
    start = train.add_mutually_exclusive_group()
    start.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in output_dir"
    )
    start.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    with_config(
        "validate",
        "Check CONFIG, its data, the models and how their vocabularies are matched: every check train makes "
        "before it loads weights; no training.",
    )
    with_config(
        "cache",
        "Run every teacher that has both `model` and `cache` over the data once and write its top-k "
        "outputs to that folder; training then reads them and loads no teacher. An interrupted run "
        "continues where it stopped.",
    )
    _eval_commands(commands)
    return parser


def _eval_commands(commands: argparse._SubParsersAction) -> None:
    """`eval`, `bench` and `report`: what the student kept, how fast it is, and the run report."""
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
    text = "Parameters, size, peak memory and tokens/s of teacher and student; writes bench.json."
    bench = commands.add_parser("bench", help=text, description=text)
    bench.add_argument("target", help=target_help)
    bench.add_argument("--teacher", help="teacher model (default: the run's teacher)")
    bench.add_argument("--prompt-tokens", type=int, default=256, help="prompt length (default 256)")
    bench.add_argument("--new-tokens", type=int, default=64, help="tokens generated (default 64)")
    bench.add_argument("--batch-size", type=int, default=1, help="sequences at once (default 1)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs, median taken (default 3)")
    bench.add_argument("--output", help="where to write bench.json (default: inside the run folder)")
    text = "Write report.md and report.html (config, loss curves, eval and bench tables) into RUN_DIR."
    commands.add_parser("report", help=text, description=text).add_argument("run_dir", help="a run folder")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "accelerate", "datasets", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if _rank() > 0:  # under `accelerate launch` only the main process reports progress
        logging.getLogger("kdistill").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        handlers = {
            "train": _train,
            "cache": _cache,
            "validate": _validate,
            "eval": _eval,
            "bench": _bench,
            "report": _report,
        }
        return handlers[args.command](args)
    except KdistillError as err:
        print(f"kdistill: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)  # 2: bad input; 3: a guard stopped the run
    except KeyboardInterrupt:
        print("kdistill: interrupted", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> int:
    from kdistill.config import load_config
    from kdistill.eval.report import report_after_training
    from kdistill.run.loop import train
    from kdistill.run.stop_signals import Interrupted

    cfg = load_config(args.config, args.overrides)
    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite, config_path=args.config)
    except Interrupted as stop:
        if _rank() == 0:
            print(f"kdistill: {stop}\nkdistill: resume with: {_resume_command(args)}", file=sys.stderr)
        return 128 + stop.signum  # the shell's code for a process ended by that signal
    if _rank() > 0:
        return 0
    report_after_training(Path(summary.output_dir))  # report.md / report.html: config, loss curves, tables
    print(f"\nstudent written to {summary.output_dir} after {summary.steps} steps in {summary.seconds:.0f} s")
    print(_quality_table(summary.before, summary.after))
    return 0


def _cache(args: argparse.Namespace) -> int:
    from kdistill.config import load_config
    from kdistill.models.parts import default_device
    from kdistill.teacher.packing import bytes_per_token
    from kdistill.teacher.precompute import cache_teachers

    cfg = load_config(args.config, args.overrides)
    for name, manifest in cache_teachers(cfg, default_device()):
        header = manifest["header"]
        tokens = sum(s["tokens"] for s in manifest["splits"].values())
        size = sum(sh["bytes"] for s in manifest["splits"].values() for sh in s["shards"])
        entries = header["top_k"] + header["tail_samples"]
        print(
            f"teacher {name}: {tokens:,} trained tokens, {size / 2**20:.1f} MiB on disk "
            f"({size / max(tokens, 1):.0f} bytes a token; {bytes_per_token(entries, header['vocab_size'])} "
            f"of them the top {header['top_k']} and {header['tail_samples']} tail samples)"
        )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from kdistill.config import load_config
    from kdistill.run.validate import validate_run

    cfg = load_config(args.config, args.overrides)
    for line in validate_run(cfg):
        print(line)
    print(f"{args.config}: OK")
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _resume_command(args: argparse.Namespace) -> str:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "the same `accelerate launch ...` command with --resume added"
    sets = [f"--set {shlex.quote(item)}" for item in args.overrides]
    return " ".join(["kdistill train", shlex.quote(args.config), *sets, "--resume"])


def _limit(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of items or 'all', got {text!r}")
    return int(text)


def _eval(args: argparse.Namespace) -> int:
    from kdistill.eval.load import load_eval_models
    from kdistill.eval.runner import EvalSettings, evaluate, write_json
    from kdistill.eval.tables import eval_table, text_table
    from kdistill.eval.tasks import NO_DATA, benchmark_source, parse_tasks

    tasks = parse_tasks(args.tasks)
    source = benchmark_source(args.data_dir) if tasks else None
    if tasks and source is None:
        if args.tasks != "all":  # asked for by name: an error; by default: the held-out part still runs
            raise KdistillError(NO_DATA)
        logging.getLogger("kdistill").warning("%s; benchmarks skipped", NO_DATA)
        tasks = []
    models = load_eval_models(args.target, args.teacher, args.validation)
    settings = EvalSettings(
        tuple(tasks), source, args.limit, args.rows, args.rouge_rows, args.generations,
        args.max_new_tokens, args.batch_size, args.num_fewshot,
    )  # fmt: skip
    result = evaluate(models, settings)
    for shown in result.get("generations", []):
        print(f"\n### {shown['prompt'][:300]}")
        for who in ("reference", "student", "teacher"):
            if who in shown:
                print(f"--- {who}: {shown[who][:400]}")
    print("\n" + text_table(eval_table(result)))
    output = args.output or (models.run_dir / RunFiles.EVAL if models.run_dir else None)
    if output:
        write_json(result, Path(output))
        print(f"\nwritten to {output}")
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


def _report(args: argparse.Namespace) -> int:
    from kdistill.eval.report import write_report

    print(f"report written to {write_report(args.run_dir)} and report.md beside it")
    return 0


def _quality_table(before: dict[str, float], after: dict[str, float]) -> str:
    rows = ["held-out           before      after"]
    for key, label in (("kl", "KL to teacher"), ("ppl", "perplexity"), ("ce", "cross-entropy")):
        if key in before and key in after:
            rows.append(f"{label:<15} {before[key]:>9.4f}  {after[key]:>9.4f}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
