"""dist_robust/torchrun.py: which torchrun failures are a stop by a signal, and the status they give.
(The real stops: tests/test_launch.py, SIGTERM to launch/torchrun.sh and to a slurm job.)"""
import signal

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from dist_robust.torchrun import stop_status


def _ranks_failed(*codes: int) -> ChildFailedError:
    return ChildFailedError("dist_robust", {rank: ProcessFailure(rank, 1000 + rank, code, "<N/A>")
                                            for rank, code in enumerate(codes)})


def test_a_signal_to_the_agent_or_ranks_stopped_by_one_give_128_plus_the_signal():
    assert stop_status(SignalException("got signal: 15", signal.SIGTERM)) == 143
    assert stop_status(SignalException("got signal: 1", signal.SIGHUP)) == 129
    assert stop_status(_ranks_failed(143, 143)) == 143  # SIGTERM to a rank: every rank stops, 143
    assert stop_status(_ranks_failed(-15)) == 143  # a rank ended by the signal itself (outside a loop)
    assert stop_status(_ranks_failed(130, 143)) == 143
    assert stop_status(_ranks_failed(-2)) == 130


def test_any_other_failure_is_torchruns_own():
    assert stop_status(_ranks_failed(143, 1)) is None  # a rank failed on its own: its traceback matters
    assert stop_status(_ranks_failed(-9)) is None  # SIGKILL (the OOM killer) is no clean stop
    assert stop_status(RuntimeError("rendezvous timed out")) is None
