"""The report's section on a student that `kdistill prune` wrote: its shape, where it started, and
the candidates `--search` ranked. Read from the `prune.json` in the run's `student.model` folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kdistill.eval.tables import Table, number
from kdistill.files import RunFiles


def pruning_blocks(run_dir: Path) -> list[tuple[str, Any]]:
    """("h2", ...), ("p", ...) and ("table", ...) blocks, or none when the student was not pruned so."""
    record = _prune_record(run_dir)
    if not record:
        return []
    s, params, q = record["shape"], record["params"], record["held_out_before_training"]
    text = (
        f"The student was written by `kdistill prune` ({record['method']}): {_shape(s)}, "
        f"{params['total']:,} parameters ({params['total'] / record['teacher_params']['total']:.1%} of "
        f"the teacher's). Before training, on {q['tokens']:.0f} held-out response tokens: perplexity "
        f"{number(q['ppl'])} (teacher {number(q['teacher_ppl'])}), KL to the teacher {q['kl']:.3f}, top-1 "
        f"agreement {q['agree']:.1%}."
    )
    blocks: list[tuple[str, Any]] = [("h2", "The pruned student"), ("p", text)]
    search = record.get("search")
    if search:
        blocks.append(
            ("p", f"`--search {search['finalists']}`: the shapes of the budget, the finalists trained "
             f"{search['steps']} steps each; the one with the lowest KL after them was kept.")
        )  # fmt: skip
        blocks.append(("table", search_table(search)))
    return blocks


def search_table(search: dict[str, Any]) -> Table:
    headers = ["shape", "params", "untrained KL", "KL after the short run", "perplexity after", ""]
    rows = []
    for row in search["candidates"]:
        trained = row["trained"] or {}
        rows.append(
            [
                _shape(row["shape"]),
                f"{row['params']['total'] / 1e6:.1f} M",
                f"{row['untrained']['kl']:.3f}",
                number(trained.get("kl")),
                number(trained.get("ppl")),
                "kept" if row["chosen"] else "",
            ]
        )
    return headers, rows


def _shape(s: dict[str, int]) -> str:
    layers = s.get("layers", s.get("num_hidden_layers"))
    hidden = s.get("hidden", s.get("hidden_size"))
    mlp = s.get("intermediate", s.get("intermediate_size"))
    heads = s.get("heads", s.get("num_attention_heads"))
    kv = s.get("kv_heads", s.get("num_key_value_heads"))
    return f"{layers} layers, hidden {hidden}, MLP {mlp}, {heads} heads / {kv} key-value groups"


def _prune_record(run_dir: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load((run_dir / RunFiles.CONFIG).read_text()) or {}
        folder = (config.get("student") or {}).get("model")
        return json.loads((Path(folder) / "prune.json").read_text()) if folder else {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}
