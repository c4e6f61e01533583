"""`kdistill` command line: parsing and printing only; the work happens in the packages."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kdistill.errors import KdistillError

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
    train.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in output_dir"
    )
    train.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    with_config(
        "validate", "Check CONFIG, its data, and that teacher and student share a vocabulary; no training."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "accelerate", "datasets", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return {"train": _train, "validate": _validate}[args.command](args)
    except KdistillError as err:
        print(f"kdistill: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdistill: interrupted", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> int:
    from kdistill.config import load_config
    from kdistill.train.loop import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"\nstudent written to {summary.output_dir} after {summary.steps} steps in {summary.seconds:.0f} s")
    print(_quality_table(summary.before, summary.after))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from kdistill.config import load_config
    from kdistill.train.setup import validate_run

    cfg = load_config(args.config, args.overrides)
    for line in validate_run(cfg):
        print(line)
    print(f"{args.config}: OK")
    return 0


def _quality_table(before: dict[str, float], after: dict[str, float]) -> str:
    rows = ["held-out           before      after"]
    for key, label in (("kl", "KL to teacher"), ("ppl", "perplexity"), ("ce", "cross-entropy")):
        if key in before and key in after:
            rows.append(f"{label:<15} {before[key]:>9.4f}  {after[key]:>9.4f}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
