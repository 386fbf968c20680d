"""torchrun, with an exit status a scheduler can key on when a run is stopped by a signal.

``python -m dist_robust.torchrun ARGS`` is ``torchrun ARGS`` (the same agent, in this process);
launch/torchrun.sh and launch/slurm.sbatch start it. torchrun 2.14 passes a SIGTERM it receives on
to its ranks, waits for them (they stop at one step with a checkpoint and exit 143), and then exits 1
with a 25-line traceback of its own ``SignalException``: a requeue keyed on 143 would not fire. Here
a stop ends with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT) and one line:

- the agent received the signal (SIGTERM, SIGINT, SIGHUP or SIGQUIT: those torchrun handles);
- or every rank that failed ended by SIGTERM or SIGINT (a signal sent to the ranks, not the agent).

Any other failure is torchrun's own: its traceback, failure table and status 1. A second signal while
the agent waits for its stopping ranks is ignored: torchrun would abandon the wait (the ranks may be
writing their checkpoint) with a second traceback; slurm sends one to every process of a job, and
srun passes its own on, so the agent gets two. This floor imports nothing of the project.
"""
from __future__ import annotations

import signal
import sys

STOPS = (signal.SIGTERM, signal.SIGINT)


def stop_status(error: BaseException) -> int | None:
    """128 + the signal that stopped the run, or None when ``error`` is not a stop."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    if isinstance(error, SignalException):
        return 128 + error.sigval
    if isinstance(error, ChildFailedError):  # a rank killed by the signal has exit code -signal
        codes = {128 - c if c < 0 else c for c in (f.exitcode for f in error.failures.values())}
        stops = {128 + s for s in STOPS}
        if codes <= stops:
            return max(codes)  # SIGTERM's 143 over SIGINT's 130
    return None


def _first_signal_only() -> None:
    from torch.distributed.elastic.multiprocessing import api
    handler, seen = api._terminate_process_handler, []

    def once(signum, frame):
        if not seen:
            seen.append(signum)
            handler(signum, frame)
    api._terminate_process_handler = once  # looked up when the agent installs its handlers


def main(argv=None) -> int:
    from torch.distributed import run
    _first_signal_only()
    try:
        run.main(argv)  # torchrun's main: parses argv (sys.argv[1:] when None), writes its error file
    except Exception as e:
        status = stop_status(e)
        if status is None:
            raise
        print(f"torchrun: stopped by {signal.Signals(status - 128).name}; its ranks have exited "
              f"(exit status {status})", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
