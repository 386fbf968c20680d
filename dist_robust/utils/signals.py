"""SIGTERM and SIGINT noted instead of ending the process, so that every rank stops at one boundary.

Clusters and clouds stop jobs with SIGTERM (spot preemption, ``scancel``, Kubernetes; torchrun passes the
one it receives on to its ranks, and kills them 30 s later). Inside a loop that can stop cleanly (a
training step, an evaluation block, a RiFT module) such a signal is only noted (``StopSignals``); the
loop's per-step collective carries the note to every rank, all ranks stop at the same boundary, save what
the same command needs to continue, and raise ``Stopped``: the command exits with 128 + the signal's
number (143 for SIGTERM, 130 for SIGINT, as a shell reports them). The collective itself lives with the
loops (they import ``dist``; this floor imports nothing of the project).
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TRAINING = "the checkpoint is written: the same command (train.resume=auto) continues it"


class Stopped(Exception):
    """Raised on every rank once the state of the boundary where a stop signal was honoured is saved;
    ``saved`` says what was saved and how to continue (a training checkpoint by default)."""

    def __init__(self, signum: int, where: str, saved: str = TRAINING):
        self.signum, self.status = signum, 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; {saved}")


class StopSignals:
    """While entered, SIGTERM and SIGINT set ``received`` (the first signal's number) instead of ending
    the process. Handlers can only be set from the main thread: elsewhere this does nothing.

    A signal noted but never honoured (it came after the loop's last collective) is not lost: on a
    normal exit the previous handlers are restored and the signal is raised again for them, so the
    process ends as it would have without this (or an enclosing ``StopSignals`` notes it)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _note(self, signum, frame) -> None:
        self.received = self.received or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in STOP_SIGNALS}
        return self

    def __exit__(self, exc_type, *exc) -> None:
        installed = bool(self._previous)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        if installed and exc_type is None and self.received:  # noted, never honoured: passed on
            signal.raise_signal(self.received)
