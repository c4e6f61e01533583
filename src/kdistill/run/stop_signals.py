"""SIGINT and SIGTERM: finish the current step, write a checkpoint, and exit saying how to resume.

A cluster scheduler sends SIGTERM before it kills a job, and Ctrl-C sends SIGINT. Stopping in the
middle of a step would lose the step and, under several processes, leave the others waiting in a
collective; so the handler only records the request and the loop stops at the next step boundary.
A second signal stops at once (KeyboardInterrupt), for a user who does not want to wait.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch

log = logging.getLogger("kdistill")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; the CLI turns this into its exit message."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"; checkpoint written to {checkpoint}" if checkpoint else ""
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}{where}")


class StopSignals:
    """Context manager that turns SIGINT/SIGTERM into a request the training loop polls.

    Handlers can only be installed from the main thread; elsewhere (a training run started from a
    worker thread) the signals keep their usual behaviour.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: stop now
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s received: finishing the current step, then writing a checkpoint (send it again to stop "
            "at once, without one)",
            signal.Signals(signum).name,
        )

    def requested(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int | None:
        """The signal to stop on, agreed by all processes (one may have been signalled before another)."""
        if reduce is None:
            return self.signum
        got = reduce(torch.tensor([self.signum or 0], dtype=torch.float64))  # max over processes
        return int(got.item()) or None
