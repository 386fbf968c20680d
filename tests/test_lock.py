"""One writer per run folder (dist_robust/lock.py), with real processes: a second train into a folder in
use exits 2 naming the holder (its preflight is the one that writes nothing: test_bad_input); a lock left by a killed process (same host) is taken
over with a warning; a finished run leaves no lock behind."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ENV, QUICKSTART, ROOT, TINY

pytestmark = pytest.mark.multiproc


def _train(tmp_path, *extra):
    return [sys.executable, "-m", "dist_robust", "train", QUICKSTART, *TINY, "train.log_every=1",
            f"run.out_dir={tmp_path}", "run.name=run", *extra]


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    lock = tmp_path / "run" / ".lock"
    first = subprocess.Popen(_train(tmp_path, "train.epochs=50"), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "log.jsonl").is_file():  # training: the lock is taken
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        held = json.loads(lock.read_text())
        assert held["pid"] == first.pid
        second = subprocess.run(_train(tmp_path), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip()
        assert len(err.splitlines()) == 1 and f"in use by pid {first.pid} on {held['host']}" in err, err
        assert json.loads(lock.read_text()) == held
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock
        first.wait()
    assert json.loads(lock.read_text())["pid"] == first.pid
    third = subprocess.run(_train(tmp_path, "train.epochs=50", "train.resume=never", "train.epochs=1"), cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"taking over the lock of {tmp_path / 'run'}: its process {first.pid}" in third.stderr
    assert not lock.exists()  # released at the end


def test_the_ranks_of_one_launch_share_the_lock(tmp_path, monkeypatch):
    from dist_robust import lock
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    path = lock.acquire(tmp_path)
    lock.check(tmp_path)  # another rank of the same launch goes on
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    with pytest.raises(Exception, match=f"in use by pid {os.getpid()}"):
        lock.check(tmp_path)
    with pytest.raises(Exception, match="choose another run.name"):
        lock.acquire(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    assert lock.acquire(tmp_path) == path  # a restart of the same launch takes it over
    lock.release(path)
    assert not path.exists()


def test_ranks_under_another_launcher_share_its_rendezvous_as_launch_id(monkeypatch):
    """DeepSpeed's launcher sets neither torchrun's run id nor slurm's: its ranks (other pids) share the
    rendezvous address, so rank 1 goes on under rank 0's lock."""
    from dist_robust import lock
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29731")
    assert lock.launch_id() == "rendezvous:127.0.0.1:29731"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert lock.launch_id() == f"pid:{__import__('socket').gethostname()}:{os.getpid()}"


def test_written_files_get_the_mode_open_would_give(tmp_path):
    """Results and checkpoints are readable by the group like any file the user writes (mkstemp's 0600 is not kept)."""
    from dist_robust.utils import atomic_write
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "results.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644
