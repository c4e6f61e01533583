"""`training.on_policy.overlap`: the vLLM engine samples the next on-policy step's rows while this step
trains, so that an engine on a device of its own keeps sampling while the student trains.

The rows of step n are sent while step n - 1 trains, so they come from weights no fresher than those
after step n - 2: every step samples at least one step behind (`gen/staleness` from 1 to `sync_steps`).
Before sending them, the engine is synced when they would otherwise be more than `sync_steps` steps
behind. A step takes the rows in flight only when it asks for exactly those (the same prompts and
seeds); an out-of-memory back-off that re-cut the window asks for others, which the engine then
samples at once. A checkpoint keeps the rows in flight, so a resumed run trains on what the
uninterrupted one would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from kdistill.sampling.engine import VllmEngine
from kdistill.sampling.generate import Sampling

Rows = list[list[list[int]]]  # per batch, per row: token ids


class Overlap:
    """The engine with one step's rows in flight; `sample` and `maybe_sync` stand in for the engine's."""

    def __init__(self, engine: VllmEngine) -> None:
        self.engine = engine
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kdistill-overlap")
        self._step: int | None = None
        self._weights = 0  # the optimizer step whose weights sample the rows in flight
        self._asked: tuple[Rows, list[int]] | None = None
        self._answer: Future | None = None
        self.engine_seconds = 0.0  # how long the engine took for the rows the last step took

    def __enter__(self) -> Overlap:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def staleness(self, step: int) -> int:
        """How many optimizer steps behind step `step`'s rows are sampled (those in flight: when sent)."""
        return step - 1 - self._weights if self._step == step else self.engine.staleness(step)

    def maybe_sync(self, student: Any, step: int) -> None:
        """Before step `step` generates: nothing when its rows are in flight (they keep the weights they
        were sent with); otherwise the engine's own rule."""
        if self._step != step:
            self._settle()
            self.engine.maybe_sync(student, step)

    def send(self, student: Any, step: int, batches: Rows, sampling: Sampling, seeds: list[int]) -> None:
        """While step `step - 1` trains on `student`: sync if step `step` would sample more than
        `sync_steps` steps behind, then send its rows."""
        engine = self.engine
        self._settle()
        if engine.staleness(step) > engine.settings.sync_steps:
            if engine.processes is not None:  # every process has its rows before the weights change
                engine.processes.wait_for_everyone()
            engine.sync(student, step - 2)
        self._step, self._weights, self._asked = step, engine.synced, (batches, list(seeds))
        self._answer = self._pool.submit(self._timed, batches, sampling, list(seeds))

    def _settle(self) -> None:
        """Wait for rows still in flight (a step retried after running out of memory sent them), so
        that no sync changes the weights under them."""
        if self._answer is not None:
            self._answer.result()

    def _timed(self, batches: Rows, sampling: Sampling, seeds: list[int]) -> tuple[Rows, float]:
        began = time.perf_counter()
        answer = self.engine.sample(batches, sampling, seeds)
        return answer, time.perf_counter() - began

    def sample(self, batches: Sequence[list[list[int]]], sampling: Sampling, seeds: Sequence[int]) -> Rows:
        """The rows in flight when they are these; otherwise (after waiting for those) sampled now."""
        asked, answer = self._asked, self._answer
        self._step, self._asked, self._answer = None, None, None
        if answer is not None:
            rows, seconds = answer.result()
            if asked == (list(batches), list(seeds)):
                self.engine_seconds = seconds
                return rows
        began = time.perf_counter()
        rows = self.engine.sample(batches, sampling, seeds)
        self.engine_seconds = time.perf_counter() - began
        return rows

    def state(self) -> dict | None:
        """The rows in flight, once sampled, for a checkpoint (None: none in flight)."""
        if self._answer is None:
            return None
        rows, _ = self._answer.result()
        batches, seeds = self._asked
        return {
            "step": self._step,
            "weights": self._weights,
            "batches": batches,
            "seeds": seeds,
            "rows": rows,
        }

    def restore(self, state: dict | None) -> None:
        """Put back the rows a checkpoint kept in flight."""
        if not state:
            return
        answer: Future = Future()
        answer.set_result((state["rows"], 0.0))
        self._step, self._weights = state["step"], state["weights"]
        self._asked, self._answer = (state["batches"], state["seeds"]), answer
