"""One accounting for every arm of `vs_peers.py`: the same steps timed, the same work counted, the same
memory measure.

- Time: every arm's optimizer steps are stamped by one global torch hook (`register_optimizer_step_post_hook`,
  which fires after any `torch.optim` optimizer's step, kdistill's and TRL's alike). The timed window is
  from the end of the last warm-up step to the end of the last timed step, whatever each trainer's own
  clock would include (TRL's `on_train_begin`, kdistill's loop).
- Work: each arm reports the rows it trains on per step (`Ledger.rows`), from the labels it trains:
  trained tokens (labels that are not -100), rows, and rows whose trained labels hold EOS (a response that
  ended before `max_new_tokens`). The step a row belongs to is the number of optimizer steps done when it
  was counted.
- Memory: the parent samples the proportional set size (PSS, `/proc/PID/smaps_rollup`) of the worker
  and every process it started, the vLLM engine's included, summed, each second; the peak of those sums.
  PSS shares a page between the processes that map it, so nothing is counted twice (summed RSS would).
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


class Ledger:
    """The optimizer steps' end times and the work of each step, in one worker process."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.work: list[tuple[int, ...]] = []  # (step, rows, trained tokens, rows ending at EOS, tokens)
        register_optimizer_step_post_hook(lambda *_: self.ends.append(time.perf_counter()))

    def rows(self, labels: torch.Tensor, eos: int, mask: torch.Tensor | None = None) -> None:
        """Count a batch of rows `labels` `(B, T)` (-100 where nothing trains; `mask`: its non-padding
        tokens) for the current step."""
        trained = labels != -100
        ended = ((labels == eos) & trained).any(-1)
        tokens = int(mask.sum()) if mask is not None else 0
        self.work.append((len(self.ends), labels.shape[0], int(trained.sum()), int(ended.sum()), tokens))

    def result(self, warmup: int, timed: int) -> dict:
        """The timed steps (`warmup` untimed first, at least one, so every clock starts at a step's end)."""
        if warmup < 1 or len(self.ends) < warmup + timed:
            raise SystemExit(f"{len(self.ends)} optimizer steps ran; the window needs {warmup} + {timed}")
        seconds = self.ends[warmup + timed - 1] - self.ends[warmup - 1]
        window = [w for w in self.work if warmup <= w[0] < warmup + timed]
        rows, trained, eos, tokens = (sum(w[i] for w in window) for i in (1, 2, 3, 4))
        return {"timed_s": seconds, "timed_steps": timed, "rows": rows, "trained": trained, "eos_rows": eos,
                "steps_per_s": timed / seconds, "trained_tokens_per_s": trained / seconds,
                "mean_generated": trained / max(rows, 1), "tokens": tokens,
                "tokens_per_s": tokens / seconds}  # fmt: skip


def _tree(root: int) -> list[int]:
    """`root` and every process descended from it."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


def pss_mib(root: int) -> float:
    """The summed PSS of `root`'s process tree, in MiB."""
    total = 0
    for pid in _tree(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        if "Pss:" in text:
            total += int(text.split("Pss:")[1].split()[0])
    return total / 1024


class PeakPss:
    """`with PeakPss(pid) as peak:` samples the tree's summed PSS each `interval` s; `peak.mib` after."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid, self.interval, self.mib = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.mib = max(self.mib, pss_mib(self.pid))

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def summary(runs: list[dict], arms: tuple[str, ...], peer: str) -> dict:
    """Medians per arm, each repetition's ratios to `peer`, and warnings where arms' work per step differs
    by more than 5 %."""
    keys = ("steps_per_s", "trained_tokens_per_s", "mean_generated", "eos_rows", "rows", "pss_peak_mib")
    medians = {a: {k: statistics.median(r[k] for r in runs if r["arm"] == a) for k in keys} for a in arms}
    reps = sorted({r["rep"] for r in runs})
    per_rep = {a: [] for a in arms}
    for rep in reps:
        base = next(r for r in runs if r["arm"] == peer and r["rep"] == rep)
        for r in (r for r in runs if r["rep"] == rep):
            per_rep[r["arm"]].append(r["trained_tokens_per_s"] / base["trained_tokens_per_s"])
    work = {
        a: statistics.median(r["trained"] / r["timed_steps"] for r in runs if r["arm"] == a) for a in arms
    }
    warnings = [
        f"WARNING: {a} trained {work[a]:.0f} tokens a step, {peer} {work[peer]:.0f}: unequal work per step"
        for a in arms
        if abs(work[a] - work[peer]) > 0.05 * work[peer]
    ]
    ratios = {a: {"tokens_per_s": medians[a]["trained_tokens_per_s"] / medians[peer]["trained_tokens_per_s"],
                  "pss": medians[a]["pss_peak_mib"] / medians[peer]["pss_peak_mib"],
                  "each_rep": per_rep[a]} for a in arms}  # fmt: skip
    return {"medians": medians, "ratios": ratios, "work_per_step": work, "warnings": warnings}


def table(runs: list[dict], result: dict, peer: str) -> list[str]:
    """The runs and medians as markdown lines."""
    lines = [
        "| arm | rep | steps/s | trained tokens/s | mean generated/row | rows at EOS | peak PSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['arm']} | {r['rep']} | {r['steps_per_s']:.3f} | {r['trained_tokens_per_s']:.1f} | "
            f"{r['mean_generated']:.1f} | {r['eos_rows']}/{r['rows']} | {r['pss_peak_mib']:.0f} |"
        )
    for arm, m in result["medians"].items():
        ratio = result["ratios"][arm]
        each = ", ".join(f"{x:.2f}x" for x in ratio["each_rep"])
        lines.append(
            f"median {arm}: {m['steps_per_s']:.3f} steps/s, {m['trained_tokens_per_s']:.1f} trained tokens/s "
            f"({ratio['tokens_per_s']:.2f}x {peer}; each repetition {each}), {m['mean_generated']:.1f} "
            f"generated/row, {m['pss_peak_mib']:.0f} MiB peak PSS ({ratio['pss']:.2f}x {peer})"
        )
    return lines + result["warnings"]
