"""The run report: `report.md` and a self-contained `report.html` in the run folder.

It gathers what the run folder holds: the resolved config, `summary.json` (steps, time, held-out
quality before and after), `metrics.jsonl` (drawn as loss and validation curves with matplotlib),
and `eval.json` / `bench.json` where `kdistill eval` / `kdistill bench` were run. The markdown links
the plots as PNG files in `report/`; the HTML carries them inline, so it can be mailed on its own.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any

from kdistill.errors import KdistillError
from kdistill.eval.charts import line_plot, retention_bars
from kdistill.eval.pruned_report import pruning_blocks
from kdistill.eval.tables import Table, bench_table, eval_table, markdown_table, number, retention_table
from kdistill.files import RunFiles, write_atomic

log = logging.getLogger("kdistill")

Block = tuple[str, Any]  # ("h2" | "p" | "pre" | "table" | "img" | "generations", content)


def write_report(run_dir: str | Path) -> Path:
    """Write `report.md`, `report.html` and `report/*.png` into `run_dir`; returns the HTML's path."""
    run_dir = Path(run_dir)
    if not (run_dir / RunFiles.CONFIG).is_file():
        raise KdistillError(f"{run_dir}: not a kdistill run folder (no kdistill_config.yaml in it)")
    blocks = report_blocks(run_dir)
    images = run_dir / "report"
    images.mkdir(exist_ok=True)
    for kind, content in blocks:
        if kind == "img":
            write_atomic(images / content[0], content[1])
    write_atomic(run_dir / RunFiles.REPORT_MD, render_markdown(blocks).encode())
    write_atomic(
        run_dir / RunFiles.REPORT_HTML, render_html(blocks, f"kdistill report: {run_dir.name}").encode()
    )
    return run_dir / RunFiles.REPORT_HTML


def report_after_training(run_dir: Path) -> None:
    """`write_report` for the end of `kdistill train`: a report that fails must not fail the run."""
    try:
        path = write_report(run_dir)
        log.info("report written to %s", path)
    except Exception as err:  # the student is already saved: say what failed and go on
        log.warning("the run report could not be written (%s); try `kdistill report %s`", err, run_dir)


def report_blocks(run_dir: Path) -> list[Block]:
    """The report's content, in order, independent of how it is drawn."""
    summary = _read_json(run_dir / RunFiles.SUMMARY)
    records = _read_jsonl(run_dir / RunFiles.METRICS)
    blocks: list[Block] = [("h1", f"kdistill report: {run_dir.name}")]
    blocks += _summary_blocks(summary)
    blocks += pruning_blocks(run_dir)
    blocks += _plot_blocks(records)
    evaluation, measured = _read_json(run_dir / RunFiles.EVAL), _read_json(run_dir / RunFiles.BENCH)
    if evaluation:
        blocks += [("h2", "What the student kept (kdistill eval)"), ("p", _eval_note(evaluation))]
        blocks.append(("table", eval_table(evaluation)))
        if evaluation.get("generations"):
            blocks += [("h2", "Generations, side by side"), ("generations", evaluation["generations"])]
    else:
        blocks.append(("p", f"No evaluation yet: run `kdistill eval {run_dir}` and then `kdistill report`."))
    if evaluation.get("retention", {}).get("tasks"):
        blocks += _retention_blocks(evaluation, measured)
    if measured:
        blocks += [("h2", "Why distill: speed and memory (kdistill bench)"), ("p", _bench_note(measured))]
        blocks.append(("table", bench_table(measured)))
    config = (run_dir / RunFiles.CONFIG).read_text()
    return [*blocks, ("h2", "Config"), ("pre", config)]


def _summary_blocks(summary: dict[str, Any]) -> list[Block]:
    if not summary:
        return [("p", "No summary.json: the run has not finished.")]
    minutes, seconds = divmod(round(summary["seconds"]), 60)
    text = (
        f"{summary['steps']} optimizer steps in {minutes} min {seconds} s on {summary['train_rows']} "
        f"training rows; {summary['validation_rows']} held-out rows."
    )
    before, after = summary.get("before", {}), summary.get("after", {})
    rows = [
        [label, number(before.get(key)), number(after.get(key))]
        for key, label in (("kl", "KL to teacher"), ("ppl", "perplexity"), ("ce", "cross-entropy"))
        if key in before or key in after
    ]
    return [("h2", "Training"), ("p", text), ("table", (["held-out", "before", "after"], rows))]


def _plot_blocks(records: list[dict[str, Any]]) -> list[Block]:
    train = [r for r in records if "loss" in r]
    held = [r for r in records if any(k.startswith("eval/") for k in r)]
    try:
        import matplotlib
    except ImportError:
        return [("p", "Loss curves need matplotlib: pip install 'kdistill[report]', then `kdistill report`.")]
    matplotlib.use("Agg")  # no display: draw straight to PNG
    blocks: list[Block] = [("h2", "Loss curves")]
    if train:
        keys = [k for k in ("loss", "loss/kd", "loss/ce", "loss/hidden") if any(k in r for r in train)]
        png = line_plot(train, keys, "training loss (per trained token)", "loss")
        blocks.append(("img", ("loss.png", png, "training loss: " + ", ".join(keys))))
    if held:
        keys = [k for k in ("eval/kl", "eval/ce") if any(k in r for r in held)]
        png = line_plot(held, keys, "held-out, per response token (T = 1)", "nats")
        blocks.append(("img", ("validation.png", png, "validation: " + ", ".join(keys))))
    return blocks


def _retention_blocks(evaluation: dict[str, Any], measured: dict[str, Any]) -> list[Block]:
    """Teacher and student side by side with the share retained above chance, and a bar per benchmark."""
    note = (
        "Retained above chance: (student − chance) / (teacher − chance) on each benchmark (acc_norm where "
        "lm-eval reports it), ± standard error; the mean counts the tasks where the teacher is at least "
        f"{round(evaluation['retention']['margin'] * 100)} points above chance."
    )
    if not measured:
        note += " Parameters, size and decode speed come from `kdistill bench`, not run yet."
    blocks: list[Block] = [("h2", "Retention: teacher and student side by side"), ("p", note)]
    blocks.append(("table", retention_table(evaluation, measured)))
    png = retention_bars(evaluation["retention"]["tasks"])
    if png is not None:
        blocks.append(("img", ("retention.png", png, "accuracy per benchmark: teacher, student and chance")))
    return blocks


def _eval_note(evaluation: dict[str, Any]) -> str:
    held = evaluation.get("held_out", {})
    bench = evaluation.get("benchmarks", {})
    parts = [f"Student `{evaluation['student']}` against teacher `{evaluation.get('teacher')}`."]
    if held:
        parts.append(f"Held-out: {held['rows']} rows of {held.get('source')}.")
    if bench:
        items = f"the first {bench['limit']}" if bench.get("limit") else "all"
        parts.append(f"Benchmarks: {items} items of each task, ± standard error.")
    parts.append(
        "Kept: student / teacher (teacher / student for perplexity); for a benchmark, the share of the "
        "teacher's accuracy above chance, n/m (not meaningful) where the teacher is within two standard "
        "errors of chance."
    )
    return " ".join(parts)


def _bench_note(measured: dict[str, Any]) -> str:
    m, s = measured.get("machine", {}), measured.get("settings", {})
    where = m.get("gpu") or f"{m.get('processor')}, {m.get('cpu_count')} cores"
    return (
        f"Measured on {where} (torch {m.get('torch')}), each model in its own process: batch "
        f"{s.get('batch_size')}, {s.get('prompt_tokens')} prompt tokens, {s.get('new_tokens')} generated."
    )


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            out.append(f"{'#' if kind == 'h1' else '##'} {content}")
        elif kind == "p":
            out.append(content)
        elif kind == "pre":
            out.append(f"```yaml\n{content.rstrip()}\n```")
        elif kind == "table":
            out.append(markdown_table(content))
        elif kind == "img":
            out.append(f"![{content[2]}](report/{content[0]})")
        elif kind == "generations":
            out.append(markdown_table(_generation_table(content)))
    return "\n\n".join(out) + "\n"


def render_html(blocks: list[Block], title: str) -> str:
    body = []
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(content)}</p>")
        elif kind == "pre":
            body.append(f"<pre>{html.escape(content)}</pre>")
        elif kind in ("table", "generations"):
            body.append(_html_table(content if kind == "table" else _generation_table(content)))
        elif kind == "img":
            data = base64.b64encode(content[1]).decode()
            body.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(content[2])}">')
    return _HTML.format(title=html.escape(title), body="\n".join(body))


def _generation_table(generations: list[dict[str, str]]) -> Table:
    roles = [r for r in ("reference", "student", "teacher") if r in generations[0]]
    return ["prompt", *roles], [[g["prompt"], *(g[r] for r in roles)] for g in generations]


def _html_table(table: Table) -> str:
    headers, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; vertical-align: top; white-space: pre-wrap; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; display: block; margin: 1rem 0; }}
pre {{ background: #f6f6f6; padding: 1rem; overflow-x: auto; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KdistillError(f"{path}:{getattr(err, 'lineno', 1)}: damaged JSON; {_UNREADABLE}") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line_number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            where = f"{path}:{line_number}"
            raise KdistillError(f"{where}: damaged JSON line ({err.msg}); {_UNREADABLE}") from None
    return rows


_UNREADABLE = "this run file cannot be read (was the run killed while writing it, or the disk full?)"
