"""Progress lines of long evaluations: lines rather than a tqdm bar, as they also reach a log file and
a batch job's output; throttled, so a fast evaluation prints none."""
from __future__ import annotations

import time

EVERY_S = 30.0  # at most one progress line per this many seconds (tests set 0)


class Every:
    """Called after each unit of work: True when ``EVERY_S`` seconds have passed since the last True
    (or since it was made), then the caller prints one line."""

    def __init__(self):
        self.seconds, self.last = EVERY_S, time.monotonic()

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True
