"""A rank stops when its launcher dies (dist_robust/orphan.py): torchrun starts every rank in a session of
its own, so without the watch a SIGKILLed agent leaves its ranks training, unseen, holding the run
folder's lock. With it, both ranks of a 2-rank run whose torchrun alone is SIGKILLed stop at one step
with its checkpoint and release the lock; a process whose launcher died before the watch began stops at
once; a command typed in a shell is not watched; a rank that ignores the SIGTERM is SIGKILLed."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ENV, QUICKSTART, REFERENCE, ROOT, children, logged_step, torchrun_cmd
from dist_robust.orphan import launched

pytestmark = pytest.mark.multiproc


def _running(pid: int) -> bool:
    """Not gone and not a zombie waiting for whoever inherited it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_ranks_stop_with_a_checkpoint_when_only_torchrun_is_sigkilled(tmp_path):
    run = tmp_path / "run"
    args = ("train", QUICKSTART, *REFERENCE, f"run.out_dir={tmp_path}", "run.name=run")
    out = tmp_path / "out.log"
    with open(out, "w") as f:
        proc = subprocess.Popen(torchrun_cmd(*args), cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    ranks = []
    try:
        deadline = time.time() + 240
        while logged_step(run) < 2 or len(children(proc.pid)) < 2:  # inside the first epoch (22 steps)
            assert proc.poll() is None and time.time() < deadline, out.read_text()[-3000:]
            time.sleep(0.05)
        ranks = children(proc.pid)
        proc.kill()  # the agent alone: its ranks are in sessions of their own and do not get it
        proc.wait()
        killed = time.monotonic()
        while any(_running(p) for p in ranks) and time.monotonic() - killed < 15:
            time.sleep(0.05)
        gone_s = time.monotonic() - killed
    finally:
        proc.kill()
        for pid in ranks:  # never leave orphans behind, whatever happened
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    text = out.read_text()
    print(f"both ranks gone {gone_s:.2f} s after torchrun's SIGKILL")
    assert gone_s < 10, f"ranks {ranks} still ran {gone_s:.0f} s after their agent died:\n{text[-3000:]}"
    assert text.count(f"the launcher (pid {proc.pid}) is gone") == 2, text[-3000:]
    assert "stopped by SIGTERM at step" in text, text[-3000:]
    step = int(text.split("stopped by SIGTERM at step ")[1].split()[0])
    assert 2 <= step < 44 and (run / "checkpoints" / f"step_{step:08d}.json").is_file(), text[-3000:]
    assert not (run / ".lock").exists()  # released: the same command can run again (and resumes)
    assert not (run / "model.json").exists()


# A process that records its parent (importing dist_robust.orphan, as the command line does first), waits
# until that parent is gone, then starts the watch: it must act at once. {handler} is what it does on
# SIGTERM; it prints what happened.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    import dist_robust.orphan as orphan
    open(sys.argv[1], "w").close()  # recorded: the launcher may go
    while os.getppid() == orphan.PARENT:
        time.sleep(0.01)
    signal.signal(signal.SIGTERM, {handler})
    watching = orphan.watch(poll_s=0.05, grace_s=0.5)
    time.sleep(1.5)
    print("not stopped, watching", watching, flush=True)
""")
STOP = "lambda s, f: (print('stopped by SIGTERM', flush=True), sys.exit(143))"
IGNORE = "lambda s, f: print('SIGTERM ignored', flush=True)"


@pytest.mark.parametrize("env, handler, printed, not_printed", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, STOP, {"stopped by SIGTERM"}, {"not stopped, watching True"}),
    ({}, STOP, {"not stopped, watching False"}, {"stopped by SIGTERM"}),  # a shell's command: nohup ... & goes on
    ({"SLURM_STEP_ID": "0"}, IGNORE, {"SIGTERM ignored"}, {"not stopped, watching True"}),  # then SIGKILLed
], ids=["rank-orphaned-before-the-watch", "plain-command", "sigterm-ignored"])
def test_a_launcher_gone_before_the_watch_began(tmp_path, env, handler, printed, not_printed):
    """The launcher (here a python that starts the child and exits at once) dies before the child's watch
    starts: a rank stops at once; a plain command is left alone; a rank deaf to SIGTERM is SIGKILLed."""
    child = tmp_path / "child.py"
    child.write_text(CHILD.format(handler=handler))
    launcher = ("import os, subprocess, sys, time; out = sys.argv[2]; p = subprocess.Popen([sys.executable, sys.argv[1], "
                "out + '.ready'], stdout=open(out, 'w'), stderr=open(out + '.err', 'w')); print(p.pid)\n"
                "while not os.path.exists(out + '.ready') and p.poll() is None: time.sleep(0.01)")
    base = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE") and not k.startswith("SLURM_")}
    r = subprocess.run([sys.executable, "-c", launcher, str(child), str(tmp_path / "out")], cwd=ROOT,
                       env={**base, **env}, capture_output=True, text=True, timeout=30)
    pid = int(r.stdout)
    deadline = time.monotonic() + 20
    while _running(pid):  # not our child: its status is not ours to read; the output says what happened
        assert time.monotonic() < deadline, f"pid {pid} still runs"
        time.sleep(0.05)
    lines = set((tmp_path / "out").read_text().splitlines())
    assert printed <= lines and not lines & not_printed, (lines, (tmp_path / "out.err").read_text())
    assert ("the launcher (pid" in (tmp_path / "out.err").read_text()) == bool(env)


def test_who_is_watched():
    assert launched({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})  # torchrun, DeepSpeed
    assert launched({"SLURM_STEP_ID": "0", "SLURM_PROCID": "3"})  # srun
    assert not launched({"SLURM_JOB_ID": "7"}) and not launched({})  # a batch script's own command, a shell's
