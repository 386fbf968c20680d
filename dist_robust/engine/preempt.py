"""SIGTERM and SIGINT stop a training run cleanly: every rank at the same step, with a checkpoint.

Clusters and clouds stop jobs with SIGTERM (spot preemption, ``scancel``, Kubernetes; torchrun passes the
one it receives on to its ranks, and kills them 30 s later). While the training loop runs, such a signal
only notes that it came; each step's one all_reduce (the finite-loss flags) carries the note to every
rank, so all ranks finish the same step, write the checkpoint of that step together and raise
``Stopped``. The command exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT, as a
shell reports them), and ``train.resume=auto`` continues bitwise as an unbroken run. Outside the loop
(setup, validation, the final evaluation) the previous handlers act: the process ends at once, and an
AutoAttack evaluation continues from its saved state when started again.
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """Raised on every rank once the checkpoint of the step where a stop signal was honoured is written."""

    def __init__(self, signum: int, where: str):
        self.signum, self.status = signum, 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; the checkpoint is written: "
                         "the same command (train.resume=auto) continues it")


class StopSignals:
    """While entered, SIGTERM and SIGINT set ``received`` (the first signal's number) instead of ending
    the process. Handlers can only be set from the main thread: elsewhere this does nothing."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _note(self, signum, frame) -> None:
        self.received = self.received or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
