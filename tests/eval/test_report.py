"""The run report: written at the end of training and by `kdistill report`, HTML parsed, plots opened."""

from __future__ import annotations

import base64
import io
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_eval_cli import trained_run

from kdistill.cli import main

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'kdistill[eval]')")
Image = pytest.importorskip("PIL.Image", reason="pillow is not installed (matplotlib brings it)")

EVAL = {
    "student": "runs/x",
    "teacher": "teacher-model",
    "held_out": {
        "source": "held.jsonl",
        "rows": 8,
        "rouge_rows": 2,
        "student": {"ppl": 20.0, "kl": 0.75, "top1": 0.5, "rouge_l": 0.2},
        "teacher": {"ppl": 10.0, "rouge_l": 0.25},
    },
    "benchmarks": {
        "limit": 100,
        "tasks": {
            "arc_easy": {
                "student": {
                    "acc": 0.5,
                    "acc_stderr": 0.05,
                    "acc_norm": 0.45,
                    "acc_norm_stderr": 0.05,
                    "n": 100,
                },
                "teacher": {
                    "acc": 0.6,
                    "acc_stderr": 0.049,
                    "acc_norm": 0.5,
                    "acc_norm_stderr": 0.05,
                    "n": 100,
                },
            }
        },
    },
    "generations": [
        {"prompt": "Name a <b>fruit</b>", "reference": "apple", "student": "pear", "teacher": "apple"}
    ],
    "kept": {"ppl": 0.5, "top1": 0.5, "rouge_l": 0.8, "arc_easy/acc": 5 / 6, "arc_easy/acc_norm": 0.9},
}
BENCH = {
    "machine": {"processor": "x86_64", "cpu_count": 2, "torch": "2.13.0"},
    "settings": {"prompt_tokens": 256, "new_tokens": 64, "batch_size": 1, "repeats": 3},
    "teacher": {"parameters": 134.5e6, "disk_bytes": 538e6, "peak_memory_bytes": 1.5 * 2**30,
                "prompt_tok_s": 400.0, "generate_tok_s": 20.0},
    "student": {"parameters": 51.1e6, "disk_bytes": 204e6, "peak_memory_bytes": 0.75 * 2**30,
                "prompt_tok_s": 1000.0, "generate_tok_s": 50.0},
    "ratios": {"parameters": 0.38, "disk_bytes": 0.38, "peak_memory_bytes": 0.5, "prompt_tok_s": 2.5,
               "generate_tok_s": 2.5},
}  # fmt: skip


class _Page(HTMLParser):
    """Collects headings, table cells and images; fails on a tag closed out of order."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.headings: list[str] = []
        self.cells: list[str] = []
        self.images: list[str] = []
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.open.append(tag)
            self.text = ""

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open.pop() == tag, f"</{tag}> closes {self.open}"
        if tag in ("h1", "h2"):
            self.headings.append(self.text)
        if tag in ("td", "th"):
            self.cells.append(self.text)

    def handle_data(self, data: str) -> None:
        self.text += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    page.close()
    assert page.open == []
    return page


def _png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :])))
    image.load()
    return image


def test_training_writes_the_report(tmp_path: Path, tiny: dict) -> None:
    run = trained_run(tmp_path, tiny, steps=4, training={"eval_steps": 2})
    page = _parse(run / "report.html")
    assert page.headings[:3] == ["kdistill report: run", "Training", "Loss curves"]
    assert "Config" in page.headings
    assert {"KL to teacher", "perplexity", "before", "after"} <= set(page.cells)
    assert len(page.images) == 2
    for src in page.images:
        image = _png(src)
        assert image.format == "PNG" and image.size[0] > 500 and image.size[1] > 300
        low, high = image.convert("L").getextrema()
        assert high - low > 100  # lines and text drawn, not a blank canvas
    markdown = (run / "report.md").read_text()
    assert "![training loss: loss, loss/kd, loss/ce](report/loss.png)" in markdown
    assert (run / "report" / "loss.png").read_bytes() == base64.b64decode(page.images[0].split(",", 1)[1])
    assert "No evaluation yet: run `kdistill eval" in markdown


def test_report_command_adds_eval_and_bench_tables(
    tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture
) -> None:
    run = trained_run(tmp_path, tiny, steps=2)
    (run / "eval.json").write_text(json.dumps(EVAL))
    (run / "bench.json").write_text(json.dumps(BENCH))
    assert main(["report", str(run)]) == 0
    assert f"report written to {run / 'report.html'}" in capsys.readouterr().out
    page = _parse(run / "report.html")
    assert "What the student kept (kdistill eval)" in page.headings
    assert "Why distill: speed and memory (kdistill bench)" in page.headings
    cells = page.cells
    assert cells[cells.index("held-out perplexity") : cells.index("held-out perplexity") + 4] == [
        "held-out perplexity", "20", "10", "50.0%"
    ]  # fmt: skip
    row = cells.index("ARC-Easy acc_norm (n=100)")
    assert cells[row : row + 4] == [
        "ARC-Easy acc_norm (n=100)",
        "0.4500 ± 0.0500",
        "0.5000 ± 0.0500",
        "90.0%",
    ]
    assert cells[cells.index("mean share kept over benchmarks") + 3] == "90.0%"
    row = cells.index("prompt tokens/s")
    assert cells[row : row + 4] == ["prompt tokens/s", "400", "1,000", "2.50×"]
    assert cells[cells.index("peak memory (max RSS)") + 1] == "1.50 GiB"
    assert "Name a <b>fruit</b>" in cells  # escaped in the HTML, read back as text
    markdown = (run / "report.md").read_text()
    assert "| held-out KL to teacher | 0.75 | 0 | — |" in markdown
    assert "| parameters | 134.5 M | 51.1 M | 0.38× |" in markdown


def test_report_without_matplotlib_and_a_failing_report(
    tmp_path: Path, tiny: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    run = trained_run(tmp_path, tiny, steps=1)
    assert "Loss curves need matplotlib" in (run / "report.md").read_text()
    assert _parse(run / "report.html").images == []

    import kdistill.eval.report as report

    def broken(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report, "write_report", broken)
    run = trained_run(tmp_path / "again", tiny, steps=1)  # training still succeeds
    assert (run / "summary.json").exists()
    assert "the run report could not be written (disk full); try `kdistill report" in caplog.text


def test_report_on_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "not a kdistill run folder (no kdistill_config.yaml in it)" in capsys.readouterr().err


def test_report_shows_retention_side_by_side_with_a_bar_chart(tmp_path: Path, tiny: dict) -> None:
    from kdistill.eval.retention import retention

    run = trained_run(tmp_path, tiny, steps=2)
    tasks = {
        **EVAL["benchmarks"]["tasks"],  # acc_norm: (0.45 - 0.25) / (0.5 - 0.25) = 80 %
        "piqa": {"student": {"acc": 0.56, "acc_stderr": 0.022, "n": 500},
                 "teacher": {"acc": 0.65, "acc_stderr": 0.021, "n": 500}},  # 0.06 / 0.15 = 40 %
        "mmlu": {"student": {"acc": 0.24, "acc_stderr": 0.019, "n": 500},
                 "teacher": {"acc": 0.27, "acc_stderr": 0.02, "n": 500}},  # the teacher near chance
    }  # fmt: skip
    evaluation = {**EVAL, "benchmarks": {"limit": 500, "tasks": tasks}, "retention": retention(tasks)}
    (run / "eval.json").write_text(json.dumps(evaluation))
    (run / "bench.json").write_text(json.dumps(BENCH))
    assert main(["report", str(run)]) == 0
    page = _parse(run / "report.html")
    assert "Retention: teacher and student side by side" in page.headings
    cells = page.cells
    assert cells[cells.index("retained above chance") - 3 : cells.index("retained above chance") + 1] == [
        "", "teacher", "student", "retained above chance"
    ]  # fmt: skip
    row = cells.index("decode tokens/s")
    assert cells[row : row + 4] == ["decode tokens/s", "20.0", "50.0", "student / teacher 2.50×"]
    assert cells[cells.index("size on disk") + 1 : cells.index("size on disk") + 3] == ["513 MiB", "195 MiB"]
    row = cells.index("PIQA acc (chance 50%)")
    assert cells[row : row + 4] == ["PIQA acc (chance 50%)", "0.6500 ± 0.0210", "0.5600 ± 0.0220", "40.0%"]
    row = cells.index("MMLU acc (chance 25%)")
    assert cells[row + 3] == "— (teacher < chance + 5 pts)"
    label = "retention above chance (mean over 2 tasks, teacher ≥ chance + 5 pts)"
    # (80 % + 40 %) / 2, ± the students' standard errors over the teacher's leads, combined
    assert cells[cells.index(label) + 3] == "60.0% ± 12.4 pts"
    image = Image.open(run / "report" / "retention.png")
    assert image.format == "PNG" and image.size[0] > 500
    low, high = image.convert("L").getextrema()
    assert high - low > 100
    assert (
        "![accuracy per benchmark: teacher, student and chance](report/retention.png)"
        in (run / "report.md").read_text()
    )
