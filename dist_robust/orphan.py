"""A rank stops when the launcher that started it dies.

torchrun starts every rank in a session of its own, so a rank outlives an agent that is SIGKILLed (the
OOM killer, ``kill -9`` of the launcher): it would train on unseen, holding its device, writing
checkpoints and the run folder's lock. ``watch`` starts a daemon thread that looks at the parent's pid
every ``POLL_S`` seconds; once the parent is gone, the thread sends this process SIGTERM, which the
training loop honours like a preemption (every rank stops at one step with its checkpoint, the lock is
released, exit 143) and which ends the process at once elsewhere. Should the process still run
``GRACE_S`` later (stuck, say, in a collective with a peer that is gone too), it is SIGKILLed, as
torchrun itself does to ranks that outlive its SIGTERM by 30 s.

Why not ``prctl(PR_SET_PDEATHSIG)``: the kernel sends that signal when the *thread* that started the
process exits, not the process. torchrun 2.14 starts its ranks from its main thread, where it would
work, but a launcher (or a script) that starts the command from a worker thread which then ends would
stop a healthy run (seen: a child started from a thread that ended 1 s later got SIGTERM with its parent
alive). Watching the pid has no such case, and works on every POSIX system.

Only ranks started by a launcher are watched (torchrun, DeepSpeed's launcher, srun: the environment
names a rank). A plain ``dist-robust train`` is not: its parent is a shell, and ``nohup dist-robust
train ... &`` followed by a logout is a legitimate way to keep such a run going after its shell ends.

The parent is recorded when this module is imported: the command line imports it before anything else of
the project (before torch's import, about 2 s), so a launcher that dies even before ``watch`` is called
is still seen as gone. This floor imports nothing of the project.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

PARENT, _RECORDED_BY = os.getppid(), os.getpid()
POLL_S = 0.5
GRACE_S = 30.0


def launched(environ=os.environ) -> bool:
    """Whether this process is a rank started by a launcher (torchrun and DeepSpeed set RANK and
    WORLD_SIZE, srun SLURM_STEP_ID), rather than a command typed in a shell."""
    return ("RANK" in environ and "WORLD_SIZE" in environ) or "SLURM_STEP_ID" in environ


def _watch(parent: int, poll_s: float, grace_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    try:
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))
        print(f"dist-robust [rank {rank}]: the launcher (pid {parent}) is gone: stopping as on SIGTERM",
              file=sys.stderr, flush=True)
    except (OSError, ValueError):  # its output went with it
        pass
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)


def watch(parent: int | None = None, poll_s: float = POLL_S, grace_s: float = GRACE_S,
          environ=os.environ) -> bool:
    """Stop this process (SIGTERM, then SIGKILL ``grace_s`` later) when its parent (by default the one it
    had when this module was imported) is gone; only for a rank started by a launcher. Whether it watches."""
    if parent is None:  # a process forked after the import has another parent: its own, now
        parent = PARENT if os.getpid() == _RECORDED_BY else os.getppid()
    if not launched(environ) or parent <= 1:  # started by init, or outside this pid namespace: no launcher
        return False
    threading.Thread(target=_watch, args=(parent, poll_s, grace_s), name="dist-robust-orphan-watch",
                     daemon=True).start()
    return True
