"""`kdistill` command line: parsing and printing only; the work happens in the packages."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from kdistill.cli.evaluation import HANDLERS as EVAL_HANDLERS
from kdistill.cli.evaluation import add_eval_commands
from kdistill.cli.prune import add_prune_command, prune
from kdistill.errors import KdistillError, ResumableInterrupt

EPILOG = (
    "Configs: see configs/quickstart.yaml and the README. Any key can be overridden with --set a.b=value."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdistill", description="Knowledge distillation of language models.", epilog=EPILOG
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, print the full traceback too (for bug reports; also KDISTILL_DEBUG=1)",
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
    _start_options(train)
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
    python = "the Python of vLLM's own environment (default .venv-vllm/bin/python: `make vllm-env`)"
    serve.add_argument("--python", default=".venv-vllm/bin/python", help=python)
    serve.add_argument(
        "--memory",
        type=float,
        help="share of the device's memory vLLM reserves (its --gpu-memory-utilization; on CPU, of RAM)",
    )
    add_eval_commands(commands)
    add_prune_command(commands, EPILOG)
    return parser


def _start_options(train: argparse.ArgumentParser) -> None:
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from output_dir's newest checkpoint")
    start.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    force = "with --resume: continue although the config changes what is trained (models, data, loss, ...)"
    train.add_argument("--force", action="store_true", help=force)


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = args.debug or bool(os.environ.get("KDISTILL_DEBUG"))
    if debug:
        os.environ["KDISTILL_DEBUG"] = "1"  # child processes (bench) then pass their tracebacks on
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "accelerate", "datasets", "peft", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if _rank() > 0:  # under `accelerate launch` only the main process reports progress
        logging.getLogger("kdistill").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    # SIGTERM stops a command as Ctrl-C does: a long phase that keeps its work says how to resume,
    # servers are stopped; training installs its own handlers (finish the step, checkpoint). Both
    # signals must reach it even when the parent blocked or ignored them (a mask and an ignored SIGINT
    # are inherited), or `kill -INT` could not stop the servers it starts.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        commands = {"train": _train, "cache": _cache, "validate": _validate, "serve": _serve, "prune": prune}
        return {**commands, **EVAL_HANDLERS}[args.command](args)
    except KdistillError as err:
        if debug:
            traceback.print_exc()
        print(f"kdistill: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)  # 2: bad input; 3: a guard stopped the run
    except ResumableInterrupt as stop:  # Ctrl-C in a long phase whose work was kept: the same command
        if _rank() == 0:
            print(f"kdistill: {stop}\nkdistill: resume with: {_command(args)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("kdistill: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a failure no check foresaw (a library's, or a bug): one line unless --debug
        if debug:
            traceback.print_exc()
        first = (str(err).splitlines() or [""])[0][:300]
        hint = "" if debug else "; run with --debug for the traceback"
        print(f"kdistill: error: {type(err).__name__}: {first}{hint}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _train(args: argparse.Namespace) -> int:
    from kdistill.api import train
    from kdistill.run.stop_signals import Interrupted

    try:
        options = {"resume": args.resume, "overwrite": args.overwrite, "force": args.force}
        summary = train(args.config, overrides=args.overrides, **options)
    except Interrupted as stop:
        if _rank() == 0:
            print(f"kdistill: {stop}\nkdistill: resume with: {_resume_command(args)}", file=sys.stderr)
        return 128 + stop.signum  # the shell's code for a process ended by that signal
    if _rank() > 0:
        return 0
    print(f"\nstudent written to {summary.output_dir} after {summary.steps} steps in {summary.seconds:.0f} s")
    print(_quality_table(summary.before, summary.after))
    return 0


def _cache(args: argparse.Namespace) -> int:
    from kdistill.config import load_config
    from kdistill.models.parts import default_device
    from kdistill.teacher.packing import bytes_per_token
    from kdistill.teacher.precompute import cache_teachers

    cfg = load_config(args.config, args.overrides)
    try:
        built = list(cache_teachers(cfg, default_device()))
    except KeyboardInterrupt:
        raise ResumableInterrupt(
            "cache: interrupted; every shard written so far is kept, and the next run builds only the rest"
        ) from None
    for name, manifest in built:
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
    from kdistill.prerun.validate import validate_run

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
    import time

    from kdistill.config import load_config
    from kdistill.serving.process import ServerProcess
    from kdistill.teacher.serve import serve_commands

    cfg = load_config(args.config, args.overrides)
    commands = serve_commands(cfg, args.python, args.memory)
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
    from kdistill.prerun.memory_advice import memory_lines
    from kdistill.prerun.memory_plan import machine_memory, memory_plan
    from kdistill.prerun.memory_shapes import device_bytes, widest_batch

    if args.processes < 1:
        raise KdistillError(f"--processes {args.processes}: expected 1 or more")
    budget = device_bytes(args.device_memory) if args.device_memory else None
    widest = widest_batch(cfg, args.processes)
    plan = memory_plan(cfg, budget, args.processes, args.strategy, widest)
    name = args.device_memory or "this machine's RAM (CPU run)"
    return memory_lines(cfg, plan, budget or machine_memory(), name)


def _quiet_libraries() -> None:
    """Silence library warnings a user cannot act on; each filter says why it is there."""
    import torch

    # DeepSpeed (imported by accelerate) warns on every start that it found no GPU and uses the CPU. Told
    # so up front where torch sees no GPU, it says nothing; with a GPU it detects the GPU as before.
    if torch.cuda.device_count() == 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # peft asks transformers' deprecated `is_gradient_checkpointing` while kdistill wraps a LoRA student:
    # a notice to peft's authors, not to the user.
    notice = "`is_gradient_checkpointing` is deprecated"
    warnings.filterwarnings("ignore", message=notice, category=FutureWarning)


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


def _quality_table(before: dict[str, float], after: dict[str, float]) -> str:
    rows = ["held-out           before      after"]
    for key, label in (("kl", "KL to teacher"), ("ppl", "perplexity"), ("ce", "cross-entropy")):
        if key in before and key in after:
            rows.append(f"{label:<15} {before[key]:>9.4f}  {after[key]:>9.4f}")
    return "\n".join(rows)
