"""SIGTERM stops a 2-rank run cleanly: sent to one rank or to torchrun (which passes it on), every rank
stops at the same step with its checkpoint, the command exits with 143 (or torchrun with its failure),
and the same command started again ends bitwise where the unbroken reference run ends. Also: a 2-rank
PGD evaluation stopped at a block and continued on 1 rank, and a 2-rank run stopped inside an epoch
continued on 1 rank (refused under train.resume=auto, from its epoch checkpoint under auto_epoch)."""
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
    # bare torchrun's own status, as the README states it (launch/torchrun.sh gives 143: tests/test_launch.py)
    assert proc.returncode == 1, out[-3000:]
    assert ("SignalException" if target == "torchrun" else "ChildFailedError") in out, out[-3000:]
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
    import sys

    from conftest import TINY
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


def test_sigterm_stops_a_2_rank_pgd_evaluation_at_a_block_and_1_rank_continues_it(tmp_path, reference):
    """SIGTERM to one rank of a 2-rank evaluation: both stop after the same round of blocks with the
    finished blocks' counts saved; the same command on 1 rank evaluates only the other blocks and ends
    with the counts of an unbroken evaluation."""
    from dist_robust.cli import main
    out, state = tmp_path / "eval.json", tmp_path / "eval.eval-state.json"
    args = ["eval", "--checkpoint", str(reference / "model.json"), "--dataset", "digits", "--limit", "96",
            "--attacks", "clean,pgd-30", "--batch-size", "8", "--out", str(out)]
    proc = subprocess.Popen(torchrun_cmd(*args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 240
        while not state.is_file():  # written after the first round of blocks
            assert proc.poll() is None and time.time() < deadline, "the evaluation ended or stalled before a block"
            time.sleep(0.005)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
        text, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and not out.exists(), text[-3000:]
    stopped = [line for line in text.splitlines() if line.startswith("dist-robust: stopped by SIGTERM after ")]
    assert len(stopped) == 1 and "blocks of the evaluation" in stopped[0] and str(state) in stopped[0], text[-3000:]
    blocks = len(json.loads(state.read_text())["blocks"])
    assert 2 <= blocks < 12 and f"after {blocks} of 12 blocks" in stopped[0]  # whole rounds of 2 blocks of 8

    assert main(args) == 0  # the same command, one process
    resumed = json.loads(out.read_text())
    assert resumed["resumed"]["blocks"] == blocks and resumed["n"] == 96 and resumed["world_size"] == 1
    assert not state.exists()
    assert main([*args[:-1], str(tmp_path / "unbroken.json"), "--batch-size", "96"]) == 0
    unbroken = json.loads((tmp_path / "unbroken.json").read_text())
    assert "resumed" not in unbroken
    assert resumed["clean"]["correct"] == unbroken["clean"]["correct"]
    assert resumed["attacks"]["pgd-30"]["correct"] == unbroken["attacks"]["pgd-30"]["correct"]


def test_a_mid_epoch_checkpoint_of_2_ranks_is_refused_on_1_rank_unless_train_resume_auto_epoch(
        tmp_path, reference, capsys):
    """The reference run's first epoch checkpoint, and a checkpoint 8 steps into its second epoch as its 2
    ranks write one when stopped there (the epoch's tensors stand for the step's). On 1 rank,
    train.resume=auto refuses it in one line that names auto_epoch; auto_epoch continues from the epoch
    checkpoint, says so in one line, and trains the second epoch again."""
    import shutil

    from dist_robust.cli import main
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(reference / "config.yaml", run / "config.yaml")
    for suffix in (".json", ".safetensors", ".train.safetensors"):
        epoch = reference / "checkpoints" / f"epoch_0001{suffix}"
        shutil.copy(epoch, run / "checkpoints" / epoch.name)
        if suffix != ".json":
            shutil.copy(epoch, run / "checkpoints" / f"step_00000030{suffix}")
    meta = json.loads((run / "checkpoints" / "epoch_0001.json").read_text())
    assert meta["step"] == 22 and len(meta["rng"]) == 2
    totals = {"loss_sum": 8.0, "correct": 200.0, "n": 256.0}
    meta.update(epoch=1, batch=8, step=30, steps_per_epoch=22, totals=[totals, totals],
                model_file="step_00000030.safetensors", train_file="step_00000030.train.safetensors")
    (run / "checkpoints" / "step_00000030.json").write_text(json.dumps(meta))
    args = ["train", QUICKSTART, *REFERENCE, f"run.out_dir={tmp_path}", "run.name=run"]

    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written inside an epoch (step 30) by 2 ranks" in err[0], err
    assert "this launch has 1 ranks" in err[0] and "train.resume=auto_epoch" in err[0], err

    assert main([*args, "train.resume=auto_epoch"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "train.resume=auto_epoch:" in line]
    assert len(said) == 1 and "step_00000030.json was written inside epoch 2 by 2 ranks" in said[0], said
    assert "continuing from epoch_0001.json, its 8 later steps trained again" in said[0], said
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r for r in log if r["kind"] == "resume"][-1]["step"] == 22
    assert [r["step"] for r in log if r["kind"] == "step"][:2] == [23, 24]  # the second epoch, from its start
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 1 and results["n"] == 101
    assert not list((run / "checkpoints").glob("step_*"))
