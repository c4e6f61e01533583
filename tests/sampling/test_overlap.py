"""`training.on_policy.overlap` (sampling/overlap.py): which weights each step's rows come from, when the
engine syncs, rows taken only when they are the ones asked for, and the rows a checkpoint keeps.

The engine here is a recorder with the engine's interface; tests/test_engine.py runs overlapping runs
on the stand-in server.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from kdistill.sampling.generate import Sampling
from kdistill.sampling.overlap import Overlap

SAMPLING = Sampling(1.0, 4, 1.0, 1.0, 16, 2, 0, 4)


@dataclass
class Settings:
    sync_steps: int


@dataclass
class Recorder:
    """Samples `[weights step, seed]` for every row; records syncs and which thread sampled."""

    settings: Settings
    synced: int = 0
    processes: None = None
    syncs: list[int] = field(default_factory=list)
    threads: list[str] = field(default_factory=list)
    delay: float = 0.0

    def staleness(self, step: int) -> int:
        return step - 1 - self.synced

    def maybe_sync(self, student: object, step: int) -> None:
        if self.staleness(step) >= self.settings.sync_steps:
            self.sync(student, step - 1)

    def sync(self, student: object, weights_step: int) -> None:
        self.syncs.append(weights_step)
        self.synced = weights_step

    def sample(self, batches: list, sampling: Sampling, seeds: list[int]) -> list:
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        return [[[self.synced, seed]] * len(rows) for rows, seed in zip(batches, seeds)]


def _run(sync_steps: int, steps: int) -> tuple[list[int], Recorder, list[list[int]]]:
    """`steps` steps as the loop drives an overlapping engine: each step's staleness and rows."""
    recorder = Recorder(Settings(sync_steps))
    staleness, taken = [], []
    with Overlap(recorder) as overlap:
        for step in range(1, steps + 1):
            overlap.maybe_sync(None, step)
            staleness.append(overlap.staleness(step))
            taken.append(overlap.sample([[[1, 2]]], SAMPLING, [step])[0][0])
            if step < steps:
                overlap.send(None, step + 1, [[[1, 2]]], SAMPLING, [step + 1])
    return staleness, recorder, taken


def test_each_step_samples_from_the_weights_of_two_steps_before_when_synced_every_step() -> None:
    staleness, recorder, taken = _run(1, 6)
    assert staleness == [0, 1, 1, 1, 1, 1]
    assert recorder.syncs == [1, 2, 3, 4]  # sent with step 3's rows onwards, from the weights of n - 2
    assert taken == [[0, 1], [0, 2], [1, 3], [2, 4], [3, 5], [4, 6]]  # [weights, seed]
    assert recorder.threads[0] == threading.current_thread().name  # the first step waits for its rows
    assert all(name.startswith("kdistill-overlap") for name in recorder.threads[1:])


def test_staleness_stays_within_sync_steps() -> None:
    staleness, recorder, taken = _run(2, 7)
    assert staleness == [0, 1, 2, 1, 2, 1, 2]
    assert recorder.syncs == [2, 4]
    assert [w for w, _ in taken] == [0, 0, 0, 2, 2, 4, 4]


def test_rows_are_sampled_while_the_step_trains() -> None:
    recorder = Recorder(Settings(1), delay=0.3)
    with Overlap(recorder) as overlap:
        began = time.perf_counter()
        overlap.send(None, 2, [[[1]]], SAMPLING, [2])
        assert time.perf_counter() - began < 0.2  # sending does not wait for the engine
        time.sleep(0.4)  # the step trains
        waited = time.perf_counter()
        assert overlap.sample([[[1]]], SAMPLING, [2]) == [[[0, 2]]]
        assert time.perf_counter() - waited < 0.2
        assert overlap.engine_seconds >= 0.3


def test_rows_other_than_those_sent_are_sampled_at_once() -> None:
    """An out-of-memory back-off re-cuts the window: the rows asked for differ from those in flight."""
    recorder = Recorder(Settings(1))
    with Overlap(recorder) as overlap:
        overlap.send(None, 2, [[[1, 2], [3, 4]]], SAMPLING, [2])
        overlap.maybe_sync(None, 2)  # its rows are in flight: no sync
        assert recorder.syncs == []
        cut = [[[1, 2]], [[3, 4]]]
        assert overlap.sample(cut, SAMPLING, [7, 8]) == [[[0, 7]], [[0, 8]]]
        assert len(recorder.threads) == 2  # the rows in flight, then the re-cut ones
        assert overlap.state() is None  # nothing left in flight


def test_a_checkpoint_keeps_the_rows_in_flight() -> None:
    recorder = Recorder(Settings(1))
    with Overlap(recorder) as overlap:
        overlap.send(None, 4, [[[1, 2]]], SAMPLING, [4])
        state = overlap.state()
    # the engine held step 0's weights: synced to those after step 2 first
    assert state == {"step": 4, "weights": 2, "batches": [[[1, 2]]], "seeds": [4], "rows": [[[2, 4]]]}
    resumed = Recorder(Settings(1), synced=3)  # the new engine holds the checkpoint's weights
    with Overlap(resumed) as overlap:
        overlap.restore(state)
        overlap.maybe_sync(None, 4)
        assert overlap.staleness(4) == 1  # from the weights it was sampled with, not the engine's
        assert overlap.sample([[[1, 2]]], SAMPLING, [4]) == [[[2, 4]]]  # not re-sampled
        assert resumed.threads == [] and resumed.syncs == []
