"""The run's journal: each record goes to log.jsonl (the machine-readable record, keys as written) and
its figures to TensorBoard event files in ``<run folder>/tb``, as scalars at the record's optimizer step:

    step   train/loss, train/lr, train/images_per_s, train/attack_success (methods that attack)
    epoch  epoch/loss, epoch/train_acc, epoch/lr, epoch/images_per_s, epoch/seconds, epoch/<method metric>
    val    val/clean, val/<attack>       accuracies on the held-out split
    eval   eval/clean, eval/<attack>     the final evaluation's accuracies

A kind not listed gives ``<kind>/<key>`` for each number in it. Rank 0 writes; the other ranks hold a
journal that writes nothing. ``tensorboard`` is imported only when a run starts (it costs start-up time),
and without it log.jsonl is still written, after a one-line warning.
"""
from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path

from .report import JsonlLog
from .utils import atomic_write

log = logging.getLogger("dist_robust")

NOT_PLOTTED = ("kind", "time", "relative_time", "epoch", "step", "n")  # the axes and bookkeeping
ACCURACIES = ("val", "eval")  # kinds that hold {"clean": {"acc"}, "attacks": {name: {"acc"}}}


def forget_after(path: Path, step: int) -> None:
    """Drop the records of ``path`` (log.jsonl) logged after ``step``: a resumed run trains those steps
    again and logs them itself, so each step is in the log once. Records without a step stay; a torn line
    goes."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (ValueError, AttributeError, TypeError):
            pass  # a line torn by a kill while it was written: the next record would run into it
    if len(kept) != len(lines):
        atomic_write(path, "".join(line + "\n" for line in kept).encode())


def scalars(record: dict) -> dict[str, float]:
    """tag -> value of one journal record (see the module's docstring)."""
    kind = record["kind"]
    if kind == "resume":  # where a resumed run continues: the log's marker, no figure
        return {}
    if kind in ACCURACIES:
        accs = {"clean": record["clean"]["acc"], **{k: v["acc"] for k, v in record.get("attacks", {}).items()}}
        return {f"{kind}/{k}": v for k, v in accs.items()}
    prefix = "train" if kind == "step" else kind
    return {f"{prefix}/{k}": v for k, v in record.items()
            if k not in NOT_PLOTTED and isinstance(v, (int, float)) and not isinstance(v, bool)}


def summary_writer(folder: Path, purge_step: int | None):
    """A SummaryWriter on ``folder``, or None (and a warning) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch raises ImportError when the tensorboard package is missing
        log.warning("no TensorBoard event files (%s); log.jsonl has every figure", e)
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


class RunLog(JsonlLog):
    """JsonlLog that also writes each record's scalars to TensorBoard. ``folder``: the run folder (None
    on the other ranks: nothing is written). ``step``: the step a resumed run continues from; TensorBoard
    hides what an earlier process logged after it (those steps are trained and logged again)."""

    def __init__(self, folder: Path | None, step: int = 0):
        super().__init__(Path(folder) / "log.jsonl" if folder is not None else None)
        self.step = step  # the last step logged: the final evaluation's record has none of its own
        self.writer = summary_writer(Path(folder) / "tb", step + 1 if step else None) if folder is not None else None
        # Closed by close(), or else when dropped or at exit (an error that ends the run included).
        self._close = weakref.finalize(self, self.writer.close) if self.writer is not None else None

    def write(self, **record) -> None:
        super().write(**record)
        if self.writer is None:
            return
        self.step = record.get("step", self.step)
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, self.step)
        # Every record on disk at once: a run that dies (or is read while it trains) loses nothing logged.
        self.writer.flush()

    def close(self) -> None:
        if self._close is not None:
            self._close()  # a finalizer runs once
            self.writer = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
