"""The samplers on the student's vLLM engine (`engine: vllm`): each step's rows sampled when the step
asks (`EngineSampler`), or a step ahead while the step before trains (`OverlapSampler`, `overlap`)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object

from kdistill.sampling.base import OnPolicy, OnPolicyParts, StepRows, Window
from kdistill.sampling.engine import EngineSettings, VllmEngine
from kdistill.sampling.generate import Rows, is_on_policy, requests, step_seed
from kdistill.sampling.overlap import Overlap


class EngineSampler(OnPolicy):
    """`with` starts the engine on the student's weights of the step the run starts from (`restore`:
    a checkpoint's), and stops it on the way out. Before a step samples, the engine is brought to the
    current weights when they are `sync_steps` steps ahead of its own; the step logs how far behind it
    samples (`gen_staleness`) and the time the sync took (`gen_sync_seconds`)."""

    def __init__(
        self, parts: OnPolicyParts, settings: EngineSettings, folder: Path, tokenizer: Any, processes: Any
    ) -> None:
        super().__init__(parts)
        self.settings, self.folder, self.tokenizer, self.processes = settings, folder, tokenizer, processes
        self.saved: dict[str, Any] = {}  # what the checkpoint the run resumes from kept
        self._stack = contextlib.ExitStack()

    def restore(self, state: dict[str, Any]) -> None:
        self.saved = state

    def __enter__(self) -> EngineSampler:
        with contextlib.ExitStack() as stack:
            self.engine = stack.enter_context(
                VllmEngine(
                    settings=self.settings,
                    folder=self.folder,
                    student=self.parts.student,
                    tokenizer=self.tokenizer,
                    step=self.saved.get("step", 0),
                    processes=self.processes,
                )
            )
            self.source: VllmEngine | Overlap = self._source(stack)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)

    def _source(self, stack: contextlib.ExitStack) -> VllmEngine | Overlap:
        """What samples the rows: the engine itself."""
        return self.engine

    def _sync(self, step: int) -> dict[str, float]:
        began = time.perf_counter()
        self.source.maybe_sync(self.parts.student, step)
        seconds = time.perf_counter() - began
        return {"gen_steps": 1, "gen_staleness": self.source.staleness(step), "gen_sync_seconds": seconds}

    def _write(self, prompts: Rows, seeds: list[int]) -> Rows:
        return self.source.sample(prompts, self.parts.sampling, seeds)


class OverlapSampler(EngineSampler):
    """The engine with the next on-policy step's rows in flight (`sampling/overlap.py`): sent while
    this step trains, kept by a checkpoint (`state`) and put back on resume."""

    def _source(self, stack: contextlib.ExitStack) -> Overlap:
        overlap = stack.enter_context(Overlap(self.engine))
        in_flight, (index, count) = self.saved.get("in_flight"), self.parts.process
        if in_flight and len(in_flight) == count:  # one entry per process
            overlap.restore(in_flight[index])
        return overlap

    def rows(self, window: Window, step: int) -> StepRows:
        rows = super().rows(window, step)
        if rows.sampled:  # the engine's time the step did not wait for
            hidden = self.source.engine_seconds - rows.stats["gen_seconds"]
            rows.stats["gen_hidden_seconds"] = max(0.0, hidden)
        return rows

    def send_ahead(self, upcoming: Window | None, step: int) -> dict[str, float]:
        """Send the engine the rows step `step` will ask for (its window `upcoming`, cut as the
        back-off cuts it); it syncs first when those rows need it."""
        if upcoming is None:
            return {}
        began, p = time.perf_counter(), self.parts
        if is_on_policy(p.sampling.lmbda, p.seed, step):
            batches, seeds = requests(upcoming, p.sampling, step_seed(p.seed, step), p.process)
            self.source.send(p.student, step, batches, p.sampling, seeds)
        return {"gen_sync_seconds": time.perf_counter() - began}

    def state(self) -> dict[str, Any]:
        """Every process's rows in flight (gathered on all)."""
        return {"in_flight": gather_object([self.source.state()])}
