"""The launchers for real: launch/torchrun.sh on 2 CPU ranks (one node, and two "nodes" meeting at a
c10d rendezvous on this machine), and launch/slurm.sbatch submitted to a real single-node slurm
(Debian's slurm 22.05, started by the module fixture with tests/slurm_ci.sh), including a requeue
that resumes from the last checkpoint."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REFERENCE, TINY, launcher_env, logged_step, same_weights

pytestmark = pytest.mark.multiproc  # every test here starts rank processes or launchers

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
SBATCH = ROOT / "launch" / "slurm.sbatch"
SLURM_CI = ROOT / "tests" / "slurm_ci.sh"
RECIPE = "configs/quickstart.yaml"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def _check_results(run_dir: Path, world: int = 2):
    res = json.loads((run_dir / "results.json").read_text())
    assert res["n"] == 101 and res["world_size"] == world and res["dataset"] == "digits"
    assert 0 <= res["clean"]["acc"] <= 1 and 0 <= res["attacks"]["pgd-3"]["acc"] <= res["clean"]["acc"]
    return res


# --- launch/torchrun.sh ------------------------------------------------------------------------------

def test_torchrun_sh_single_node(reference):
    """The shared reference run (conftest) is started by launch/torchrun.sh with NPROC_PER_NODE=2."""
    out = (reference.parent / f"{reference.name}.out").read_text()
    assert "--standalone" in out and "--nproc_per_node=2" in out  # the `set -x` line
    assert "2 ranks" in out
    _check_results(reference)


def _two_nodes(tmp_path: Path, args, tag: str):
    """Two torchrun.sh calls with NNODES=2 and the same RDZV_ENDPOINT, one rank each: the multi-node path,
    with both "nodes" on this machine. Their pids (torchrun's: the script execs it) and output files."""
    port = _free_port()
    env = launcher_env(NNODES="2", RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID=f"test-two-nodes-{tag}",
                       NPROC_PER_NODE="1", OMP_NUM_THREADS="1")
    logs = [tmp_path / f"{tag}-node{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with open(log, "w") as f:
            procs.append(subprocess.Popen(["bash", str(TORCHRUN_SH), RECIPE, *args], cwd=ROOT, env=env, stdout=f,
                                          stderr=subprocess.STDOUT))
    return port, procs, logs


def test_torchrun_sh_two_nodes_c10d_stopped_by_sigterm_resume_bitwise(tmp_path, reference):
    """The reference run (conftest) on two "nodes" of one rank each meeting at a c10d rendezvous: SIGTERM
    to both agents mid-epoch (what scancel or a preemption sends to each node's step) stops both ranks at
    one step with its checkpoint, and each torchrun.sh exits 143 without a traceback (torchrun itself: 1,
    with its SignalException's); the same two-node launch again resumes there and ends on the reference
    run's weights, bitwise (so the two-node layout also trains as the one-node one)."""
    # the reference's threads per rank: the cores shared out over its 2 ranks on one node (here each
    # "node" has one local rank and would take all the cores)
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    args = [*REFERENCE, f"train.threads={threads}", f"run.out_dir={tmp_path}", "run.name=two"]
    run = tmp_path / "two"
    t0 = time.monotonic()
    port, procs, logs = _two_nodes(tmp_path, args, "stopped")
    try:
        deadline = time.monotonic() + 240
        while logged_step(run) < 6:  # inside the first epoch (22 steps), past a step checkpoint
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
                "\n\n".join(log.read_text()[-3000:] for log in logs)
            time.sleep(0.05)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = "\n".join(log.read_text() for log in logs)
    print(f"two agents' exit statuses on SIGTERM: {codes}")
    assert codes == [143, 143] and "Traceback" not in out, out[-4000:]  # what a requeue keys on
    assert out.count("torchrun: stopped by SIGTERM; its ranks have exited (exit status 143)") == 2, out[-4000:]
    assert all("--rdzv_backend=c10d" in log.read_text() and f"--rdzv_endpoint=127.0.0.1:{port}" in log.read_text()
               for log in logs)
    assert out.count("stopped by SIGTERM at step") == 1, out[-4000:]  # rank 0's line, on its node
    step = int(out.split("stopped by SIGTERM at step ")[1].split()[0])
    assert 6 <= step < 22 and (run / "checkpoints" / f"step_{step:08d}.json").is_file(), out[-4000:]
    assert not (run / "model.json").exists() and not (run / ".lock").exists()

    port, procs, logs = _two_nodes(tmp_path, args, "resumed")
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in out)
    assert sum("2 ranks" in o for o in out) == 1  # rank 0 logs, on whichever node it landed
    assert sum(f"resumed from {run / 'checkpoints' / f'step_{step:08d}.json'}" in o for o in out) == 1
    assert same_weights(run / "model.safetensors", reference / "model.safetensors")
    _check_results(run)
    print(f"torchrun.sh, 2 nodes x 1 rank (c10d on localhost), stopped at step {step} and resumed: "
          f"{time.monotonic() - t0:.1f} s")


@pytest.fixture
def fake_project(tmp_path):
    """A copy of launch/torchrun.sh beside a fake .venv/bin/python that prints the torchrun arguments
    it is given after `-m dist_robust.torchrun` (exit 9 without them), to check the command lines
    torchrun.sh builds without running anything."""
    proj = tmp_path / "proj"
    (proj / "launch").mkdir(parents=True)
    shutil.copy(TORCHRUN_SH, proj / "launch" / "torchrun.sh")
    fake = proj / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "-m dist_robust.torchrun" ] || exit 9\nshift 2\n'
                    'echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)

    def run(*args, **env):
        e = launcher_env(**env)
        del e["DIST_ROBUST_PYTHON"]
        e["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "")  # no GPU unless a test says so
        e.pop("OMP_NUM_THREADS", None)
        e.update(env)
        return subprocess.run(["bash", str(proj / "launch" / "torchrun.sh"), *args], env=e,
                              capture_output=True, text=True, timeout=30)
    return run


def test_torchrun_sh_command_lines(fake_project):
    r = fake_project("c.yaml", "optim.lr=0.1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"OMP_NUM_THREADS={max(1, len(os.sched_getaffinity(0)) // 2)}", "--standalone",
                                     "--nproc_per_node=2", "--max_restarts=0", "-m", "dist_robust", "train",
                                     "c.yaml", "optim.lr=0.1"]
    r = fake_project("c.yaml", CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert "--nproc_per_node=4" in r.stdout.splitlines()
    r = fake_project("eval", "--checkpoint", "runs/x", NNODES="2", RDZV_ENDPOINT="h:29400", RDZV_ID="j1",
                     NPROC_PER_NODE="8")
    assert r.stdout.splitlines()[1:] == ["--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=h:29400",
                                         "--rdzv_id=j1", "--nproc_per_node=8", "--max_restarts=0", "-m",
                                         "dist_robust", "eval", "--checkpoint", "runs/x"]
    r = fake_project("c.yaml", NNODES="2", NODE_RANK="1", MASTER_ADDR="h", MAX_RESTARTS="3")
    assert r.stdout.splitlines()[1:6] == ["--nnodes=2", "--node_rank=1", "--master_addr=h", "--master_port=29500",
                                          "--nproc_per_node=2"]
    assert "--max_restarts=3" in r.stdout.splitlines()
    r = fake_project("c.yaml", NNODES="2")
    assert r.returncode == 2 and "RDZV_ENDPOINT" in r.stderr
    r = fake_project()
    assert r.returncode == 2 and "usage" in r.stderr


# --- launch/slurm.sbatch on a real slurm --------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm():
    """A private single-node slurm (munged, slurmctld, slurmd) on free ports; stopped by PID at the end."""
    if os.geteuid() != 0:
        pytest.skip("a real slurm needs root (apt-get install, daemons run as root)")
    r = subprocess.run(["bash", str(SLURM_CI), "install"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"could not install Debian's slurm packages: {(r.stdout + r.stderr).strip()[-500:]}")
    d = tempfile.mkdtemp(prefix="slurm-ci-")
    os.chmod(d, 0o755)  # munged, running as user munge, needs to reach its socket folder
    # 2 CPUs whatever this machine has: the jobs below ask for --cpus-per-task=2
    env = dict(os.environ, SLURM_CI_DIR=d, SLURM_CI_CPUS="2", SLURM_CI_CTLD_PORT=str(_free_port()),
               SLURM_CI_SLURMD_PORT=str(_free_port()))
    try:
        r = subprocess.run(["bash", str(SLURM_CI), "start"], env=env, capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, f"slurm did not start: {r.stdout}{r.stderr}"
        yield {"conf": f"{d}/slurm.conf", "dir": d}
    finally:
        subprocess.run(["bash", str(SLURM_CI), "stop"], env=env, capture_output=True, text=True, timeout=60)
        for name in ("slurmd", "slurmctld", "munged"):  # whatever `stop` could not stop
            pid_file = Path(d) / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), 9)
                except (ProcessLookupError, ValueError):
                    pass
        shutil.rmtree(d, ignore_errors=True)


def _squeue(slurm, job: str, fmt: str = "%T") -> str:
    r = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", fmt], env=launcher_env(SLURM_CONF=slurm["conf"]),
                       capture_output=True, text=True, timeout=30)
    return r.stdout.strip()


def _submit(slurm, tmp_path, *overrides) -> tuple[str, Path]:
    out = tmp_path / "slurm-%j.out"
    # the script's defaults ask for 8 CPUs and 24 h: what this 2-core node has, on the command line
    r = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", "--time=5", f"--output={out}",
                        "--job-name=test-launch", str(SBATCH.relative_to(ROOT)), RECIPE, *TINY,
                        f"run.out_dir={tmp_path}", *overrides],
                       cwd=ROOT, env=launcher_env(SLURM_CONF=slurm["conf"]), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    return job, tmp_path / f"slurm-{job}.out"


def _wait(slurm, job: str, log: Path, limit_s: float, on_poll=None) -> str:
    t_end = time.monotonic() + limit_s
    while time.monotonic() < t_end:
        state = _squeue(slurm, job)
        if on_poll is not None:
            on_poll(state)
        if state in FINAL:
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=launcher_env(SLURM_CONF=slurm["conf"]), timeout=30)
    pytest.fail(f"job {job} not finished after {limit_s} s (state {state}):\n"
                f"{log.read_text()[-3000:] if log.exists() else '(no output)'}")


def test_sbatch_two_ranks_requeued_by_usr1_resume_and_finish(slurm, tmp_path):
    """The batch script starts one rank per CPU through srun; USR1 to the batch shell (what
    --signal=B:USR1@120 sends before the time limit) requeues the job; the second run resumes from the
    checkpoint of the step where its SIGTERM stopped the ranks, and finishes."""
    t0 = time.monotonic()
    job, log = _submit(slurm, tmp_path, "run.name=rq", "train.epochs=2")
    first = tmp_path / "rq" / "checkpoints" / "epoch_0001.json"
    t_end = time.monotonic() + 120
    while not first.exists():
        assert _squeue(slurm, job) not in FINAL, log.read_text()[-3000:]
        assert time.monotonic() < t_end, f"no epoch-1 checkpoint after 120 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    env = launcher_env(SLURM_CONF=slurm["conf"])
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True, timeout=30)
    released = []

    def release(state):  # slurm holds a requeued job for 2 minutes (BeginTime): let it start now
        if state == "PENDING" and not released:
            released.append(subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env,
                                           capture_output=True, text=True, timeout=30))
    state = _wait(slurm, job, log, limit_s=180, on_poll=release)
    out = log.read_text()
    assert state == "COMPLETED", out[-3000:]
    assert released, "the job was never seen pending again after USR1"
    assert "1 node(s) x 2 rank(s)" in out and "rq: cnn3 on digits (1437 images, memory loader, 2 ranks" in out
    assert f"requeueing job {job}" in out
    assert f"job {job} restart 0 on " in out and f"job {job} restart 1 on " in out  # --open-mode=append
    # The requeue's SIGTERM stops the ranks at a step of epoch 2 with its checkpoint (engine/preempt.py):
    # the second run continues from there (from the epoch-1 checkpoint if it came outside the loop).
    stopped = re.search(r"stopped by SIGTERM at step (\d+)", out)
    resumed_from = first if stopped is None else first.with_name(f"step_{int(stopped.group(1)):08d}.json")
    assert f"resumed from {resumed_from}: " in out, out[-3000:]
    assert "epoch 2/2" in out and "epoch 1/2" in out.split("restart 1 on ")[0]
    assert "epoch 1/2" not in out.split("restart 1 on ")[1]  # not trained again
    assert "srun exited with status 0" in out.split("restart 1 on ")[1]
    # the requeue's SIGTERM: the batch shell waits for srun, which exits 143 (torchrun alone: 1, a traceback)
    assert "srun exited with status 143" in out.split("restart 1 on ")[0] and "Traceback" not in out, out[-3000:]
    _check_results(tmp_path / "rq")
    print(f"sbatch, requeue after epoch 1 and resume: {time.monotonic() - t0:.1f} s")
