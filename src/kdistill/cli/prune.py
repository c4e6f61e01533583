"""`kdistill prune`: the `from_teacher` student written as a model folder. Parsing and printing only."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_prune_command(commands: argparse._SubParsersAction, epilog: str) -> None:
    text = (
        "Make CONFIG's student.from_teacher student (pruned by importance, or cut evenly) and write it as a "
        "model folder: the model, the tokenizer, importance.json (each unit's score), prune.json (shape, "
        "parameters, held-out perplexity and KL to the teacher before training) and layers.png. Give the "
        "folder as student.model to train it."
    )
    sub = commands.add_parser("prune", help=text, description=text, epilog=epilog)
    sub.add_argument("config", help="run config, YAML or JSON")
    sub.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key"
    )
    sub.add_argument("--output", help="the student's folder (default: OUTPUT_DIR-pruned, beside the run's)")
    sub.add_argument("--eval-rows", type=int, default=64, help="held-out rows measured (default 64)")
    sub.add_argument(
        "--search",
        type=int,
        default=0,
        metavar="K",
        help="rank the shapes of the params budget: the K best untrained are each trained --search-steps "
        "steps by the run's own config, and the one with the lowest held-out KL is written",
    )
    sub.add_argument(
        "--search-steps", type=int, default=10, metavar="N", help="optimizer steps per candidate (default 10)"
    )


def prune(args: argparse.Namespace) -> int:
    from kdistill.api import prune as make

    output, summary = make(
        args.config,
        overrides=args.overrides,
        output=args.output,
        eval_rows=args.eval_rows,
        search=args.search,
        search_steps=args.search_steps,
    )
    print(summary_lines(summary, output))
    if "search" in summary:
        print(search_table(summary["search"]))
    return 0


def summary_lines(summary: dict[str, Any], output: Path) -> str:
    s, p, tp, q = (
        summary["shape"],
        summary["params"],
        summary["teacher_params"],
        summary["held_out_before_training"],
    )
    return "\n".join(
        [
            f"student written to {output} ({summary['method']}"
            + (f", layers by {summary['depth_score']})" if summary["depth_score"] else ")"),
            f"shape: {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, "
            f"MLP {s['intermediate_size']}, {s['num_attention_heads']} heads / "
            f"{s['num_key_value_heads']} key-value groups",
            f"parameters: {p['total']:,} ({p['total'] / tp['total']:.1%} of the teacher's), non-embedding "
            f"{p['non_embedding']:,}",
            f"held-out before training ({q['tokens']:.0f} response tokens): perplexity {q['ppl']:,.1f} "
            f"(teacher {q['teacher_ppl']:,.2f}), KL to the teacher {q['kl']:.3f}, "
            f"top-1 agreement {q['agree']:.1%}",
            f"time: {summary['seconds']['total']:.0f} s to score and prune",
        ]
    )


def search_table(search: dict[str, Any]) -> str:
    """The candidates, best first: untrained KL for all, KL and perplexity after the short runs."""
    lines = [
        f"search: {len(search['candidates'])} shapes of the budget, the {search['finalists']} with the "
        f"lowest untrained KL (on {search['screen_rows']} held-out rows) trained {search['steps']} steps "
        "each",
        "| layers | hidden | MLP | heads / kv | params | untrained KL | trained KL | trained ppl | |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in search["candidates"]:
        s, trained = row["shape"], row["trained"]
        after = f"{trained['kl']:.3f} | {trained['ppl']:,.1f}" if trained else "- | -"
        lines.append(
            f"| {s['layers']} | {s['hidden']} | {s['intermediate']} | {s['heads']} / {s['kv_heads']} | "
            f"{row['params']['total'] / 1e6:.1f} M | {row['untrained']['kl']:.3f} | {after} | "
            f"{'chosen' if row['chosen'] else ''} |"
        )
    return "\n".join(lines)
