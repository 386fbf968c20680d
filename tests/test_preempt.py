"""SIGTERM stops a 2-rank run cleanly: sent to one rank or to torchrun (which passes it on), every rank
stops at the same step with its checkpoint, the command exits with 143 (or torchrun with its failure),
and the same command started again ends bitwise where the unbroken reference run ends."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ENV, QUICKSTART, REFERENCE, ROOT, same_weights, torchrun_cmd

pytestmark = pytest.mark.multiproc


def _logged_step(run: Path) -> int:
    log = run / "log.jsonl"
    steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines()] if log.is_file() else []
    return max(steps, default=0)


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no rank {rank} among torchrun's children {children}")


def _stopped_then_resumed(tmp_path, reference, target: str) -> None:
    args = ("train", QUICKSTART, *REFERENCE, f"run.out_dir={tmp_path}", "run.name=run")
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun_cmd(*args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while _logged_step(run) < 6:  # inside the first epoch (22 steps), past a step checkpoint
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before step 6"
            time.sleep(0.05)
        os.kill(proc.pid if target == "torchrun" else _rank_pid(proc.pid, 1), signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0, out[-3000:]
    assert "stopped by SIGTERM at step" in out, out[-3000:]
    step = int(out.split("stopped by SIGTERM at step ")[1].split()[0])
    assert 6 <= step < 44 and (run / "checkpoints" / f"step_{step:08d}.json").is_file(), out[-3000:]
    assert not (run / "model.json").exists()
    r = subprocess.run(torchrun_cmd(*args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{step:08d}.json'}" in r.stdout + r.stderr
    assert same_weights(run / "model.safetensors", reference / "model.safetensors")


def test_sigterm_to_one_rank_stops_every_rank_at_one_step_and_resumes_bitwise(tmp_path, reference):
    _stopped_then_resumed(tmp_path, reference, "rank")


def test_sigterm_to_torchrun_stops_its_ranks_with_a_checkpoint_and_resumes_bitwise(tmp_path, reference):
    _stopped_then_resumed(tmp_path, reference, "torchrun")


def test_a_single_process_exits_143_after_its_checkpoint(tmp_path):
    """Without a launcher in between, the documented status: 128 + SIGTERM."""
    from conftest import TINY
    import sys
    args = [sys.executable, "-m", "dist_robust", "train", QUICKSTART, *TINY, "train.log_every=1",
            "train.epochs=3", f"run.out_dir={tmp_path}", "run.name=one"]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while _logged_step(tmp_path / "one") < 3:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("dist-robust: stopped by SIGTERM at ")
