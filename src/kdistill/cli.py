"""`kdistill` command line: parsing and printing only; the work happens in the packages."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from kdistill.errors import KdistillError, ResumableInterrupt
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

    train = with_config(
        "train",
        "Distil the student described by CONFIG into its output_dir (on the student's own samples too, "
        "with training.on_policy.lmbda > 0).",
    )
    start = train.add_mutually_exclusive_group()
    start.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in output_dir"
    )
    start.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    validate = with_config(
        "validate",
        "Check CONFIG, its data, the models and how their vocabularies are matched: every check train makes "
        "before it loads weights; no training.",
    )
    _memory_options(validate)
    with_config(
        "cache",
        "Run every teacher that has both `model` and `cache` over the data once and write its top-k "
        "outputs to that folder; training then reads them and loads no teacher. An interrupted run "
        "continues where it stopped.",
    )
    serve = with_config(
        "serve",
        "Start a vLLM server for every teacher of CONFIG whose `server` is on this machine, wait until each "
        "answers, keep them up until Ctrl-C or SIGTERM, then stop them (and everything they started).",
    )
    serve.add_argument(
        "--python",
        default=".venv-vllm/bin/python",
        help="the Python of vLLM's own environment (default .venv-vllm/bin/python: `make vllm-env`)",
    )
    serve.add_argument(
        "--memory",
        type=float,
        help="share of the device's memory vLLM reserves (its --gpu-memory-utilization; on CPU, of RAM)",
    )
    _eval_commands(commands)
    return parser


def _memory_options(validate: argparse.ArgumentParser) -> None:
    memory = validate.add_argument_group("memory pre-flight (from config.json files; loads no weights)")
    memory.add_argument(
        "--memory",
        action="store_true",
        help="estimate the run's peak memory, part by part, and whether it fits",
    )
    memory.add_argument(
        "--device-memory",
        metavar="SIZE|GPU",
        help="a GPU's memory (24GB, 80GiB) or name (L4, A100-40GB, H100, RTX4090); "
        "default: this machine's RAM, the run on CPU",
    )
    memory.add_argument("--processes", type=int, default=1, help="training processes (GPUs), default 1")
    memory.add_argument(
        "--strategy",
        default="ddp",
        choices=["ddp", "fsdp", "zero2", "zero3"],
        help="how the student is shared among processes: replicated (ddp), or sharded (fsdp, zero3: weights, "
        "gradients and AdamW state; zero2: gradients and AdamW state)",
    )


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
    _fidelity_command(commands)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "accelerate", "datasets", "peft", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if _rank() > 0:  # under `accelerate launch` only the main process reports progress
        logging.getLogger("kdistill").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        handlers = {
            "train": _train,
            "cache": _cache,
            "validate": _validate,
            "serve": _serve,
            "eval": _eval,
            "bench": _bench,
            "report": _report,
            "fidelity": _fidelity,
        }
        return handlers[args.command](args)
    except KdistillError as err:
        print(f"kdistill: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)  # 2: bad input; 3: a guard stopped the run
    except ResumableInterrupt as stop:  # Ctrl-C in a long phase whose work was kept: the same command
        if _rank() == 0:
            print(f"kdistill: {stop}\nkdistill: resume with: {_command(args)}", file=sys.stderr)
        return 130
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
    if args.memory:
        for line in _memory(cfg, args):
            print(line)
    print(f"{args.config}: OK")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import contextlib
    import signal
    import time

    from kdistill.config import load_config
    from kdistill.teacher.server_process import ServerProcess, serve_commands

    cfg = load_config(args.config, args.overrides)
    commands = serve_commands(cfg, args.python, args.memory)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the servers as Ctrl-C does
    logs = Path(cfg.output_dir) / "logs"
    with contextlib.ExitStack() as stack:
        try:  # a signal at any point, starting included, stops every server started so far
            servers = [
                stack.enter_context(ServerProcess(c, u, logs / f"server-{n}.log")) for n, c, u in commands
            ]
            for name, _, url in commands:
                print(f"teacher {name}: served at {url} (log: {logs / f'server-{name}.log'})", flush=True)
            print("Ctrl-C or SIGTERM stops the servers", flush=True)
            while all(server.process.poll() is None for server in servers):
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("stopping the servers", flush=True)
            return 0
    raise KdistillError(f"a server stopped by itself; see the logs in {logs}")


def _memory(cfg: Any, args: argparse.Namespace) -> list[str]:
    from kdistill.run.memory_plan import longest_row, machine_memory, memory_lines, memory_plan
    from kdistill.run.memory_shapes import device_bytes

    if args.processes < 1:
        raise KdistillError(f"--processes {args.processes}: expected 1 or more")
    budget = device_bytes(args.device_memory) if args.device_memory else None
    plan = memory_plan(cfg, budget, args.processes, args.strategy, longest_row(cfg))
    name = args.device_memory or "this machine's RAM (CPU run)"
    return memory_lines(cfg, plan, budget or machine_memory(), name)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _resume_command(args: argparse.Namespace) -> str:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "the same `accelerate launch ...` command with --resume added"
    return _command(argparse.Namespace(**{**vars(args), "resume": True, "overwrite": False}))


def _command(args: argparse.Namespace) -> str:
    """The command line of `args` (a `train` or `cache` command), as the user could type it again."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "the same `accelerate launch ...` command"
    flags = [f"--{flag}" for flag in ("resume", "overwrite") if getattr(args, flag, False)]
    sets = [f"--set {shlex.quote(item)}" for item in args.overrides]
    return " ".join(["kdistill", args.command, shlex.quote(args.config), *sets, *flags])


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


def _quality_table(before: dict[str, float], after: dict[str, float]) -> str:
    rows = ["held-out           before      after"]
    for key, label in (("kl", "KL to teacher"), ("ppl", "perplexity"), ("ce", "cross-entropy")):
        if key in before and key in after:
            rows.append(f"{label:<15} {before[key]:>9.4f}  {after[key]:>9.4f}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
