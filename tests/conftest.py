"""Shared test helpers: real multi-process gloo groups on CPU, tiny recipes, and the one 2-rank
reference run that every test comparing against "an unbroken 2-rank PGD-AT run" reuses."""
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TINY = [  # a recipe small enough for a test: digits, 1 epoch, 1-step PGD-AT
    "data.name=digits", "data.subset=null", "data.batch_size=64", "model.name=cnn3", "method.name=pgd_at",
    "attack.eps=0.1", "attack.steps=1", "optim.lr=0.05", "optim.schedule=multistep",
    "optim.milestones=[2]", "train.epochs=1", "train.log_every=5", "eval.limit=101",
    "eval.attacks=[clean,pgd-3]", "data.eval_batch_size=32",
]


ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = "configs/quickstart.yaml"
# The reference run: digits, 22 steps per epoch on 2 ranks (global batch 64), 2 epochs, the LR dropping
# inside the second (so momentum and the schedule matter), random crops, a checkpoint every 3 steps
# (some inside each epoch), every step's loss logged; about 90% clean and 64% PGD-3 accuracy, 12 s.
# Tests that resume, kill, switch engine or loader, or launch differently train with these arguments
# and must end where this run ends.
REFERENCE = [*TINY, "optim.lr=0.2", "data.crop_padding=1", "train.epochs=2", "optim.milestones=[1.5]",
             "train.checkpoint_every=3", "train.log_every=1"]
RUN_ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
ENV = {**os.environ, **RUN_ENV}


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --standalone`` on nproc CPU ranks running ``dist_robust args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "dist_robust", *args]


def launcher_env(**extra) -> dict:
    """This environment without the rendezvous and rank variables a launcher reads (a suite run inside
    a slurm job or a torchrun rank must still start a one-node run), with this interpreter, plus extra."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "NNODES", "NODE_RANK",
                                "RDZV_", "NPROC_PER_NODE", "TORCHRUN_ARGS", "MAX_RESTARTS"))}
    env["DIST_ROBUST_PYTHON"] = sys.executable  # this checkout may have no .venv of its own
    env.update(extra)
    return env


def train_reference(out_dir, name: str, *extra: str, timeout: int = 600, launcher: str = "torchrun") -> Path:
    """A 2-rank torchrun run of the reference recipe (plus ``extra``) in out_dir/name, started by
    torchrun itself or (launcher="torchrun.sh") by launch/torchrun.sh; what it printed is kept beside
    the run folder, in out_dir/name.out."""
    args = ("train", QUICKSTART, *REFERENCE, f"run.out_dir={out_dir}", f"run.name={name}", *extra)
    if launcher == "torchrun.sh":  # one node, 2 ranks, this interpreter
        cmd, env = ["bash", str(ROOT / "launch" / "torchrun.sh"), *args], launcher_env(**RUN_ENV, NPROC_PER_NODE="2")
    else:
        cmd, env = torchrun_cmd(*args), ENV
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    (Path(out_dir) / f"{name}.out").write_text(r.stdout + r.stderr)
    return Path(out_dir) / name


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """The folder of the reference run, trained once per test session, through launch/torchrun.sh (so
    test_launch checks the script on this run rather than training one of its own)."""
    return train_reference(tmp_path_factory.mktemp("reference"), "ref", launcher="torchrun.sh")


# Rank processes fork from a server process that imported torch and the package once (about 2 s saved
# per process group against "spawn"); like spawn, and unlike fork, no rank inherits this pytest
# process's state (its OpenMP threads, its monkeypatches).
START_METHOD = "forkserver"
mp.set_forkserver_preload(["torch", "torch.distributed", "dist_robust.engine.train", "dist_robust.evaluate"])


def _entry(rank, world, init_file, fn, args):
    torch.set_num_threads(1)
    # A short timeout: a rank left waiting (a deadlock under test) fails the test in minutes, not half an hour.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world, *args):
    """Run fn(rank, world, *args) in ``world`` real processes joined by a gloo group; a failure in
    any rank fails the test. fn must be a module-level function (it is pickled)."""
    fd, init_file = tempfile.mkstemp(prefix="gloo-init-")
    os.close(fd)
    os.unlink(init_file)  # the file store creates it
    try:
        mp.start_processes(_entry, args=(world, init_file, fn, args), nprocs=world, start_method=START_METHOD)
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)


def _cases_entry(rank, world, fn, cases, out_dir):
    for case, args in cases.items():
        try:
            fn(rank, world, *args)
            outcome = "ok"
        except Exception as e:  # recorded, so that the other cases still run and each test fails alone
            outcome = f"rank {rank}: {type(e).__name__}: {e}"
        with open(os.path.join(out_dir, f"{case}.rank{rank}"), "w") as f:
            f.write(outcome)


def run_cases(fn, world, cases: dict, out_dir) -> dict:
    """fn(rank, world, *args) for every case of ``cases`` (id -> args), all in one group of ``world``
    processes (their start-up is paid once, not per case); returns id -> the list of the ranks'
    outcomes, "ok" or the error, for the parametrized tests to assert case by case."""
    run_ranks(_cases_entry, world, fn, cases, str(out_dir))
    return {case: [open(os.path.join(out_dir, f"{case}.rank{r}")).read() for r in range(world)] for case in cases}


def save_shard_gradients(model, x, y, method, rank, world, out_dir):
    """DDP backward of ``method.loss`` on this rank's contiguous shard of (x, y); rank 0 saves the
    averaged gradients to out_dir/grads.pt, for a test to compare with one rank on the whole batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    n = len(x) // world
    ddp = DDP(model)  # kept referenced until backward: its reducer averages the ranks' gradients
    loss, _ = method.loss(ddp, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])
    loss.backward()
    if rank == 0:
        torch.save({k: p.grad for k, p in model.named_parameters()}, f"{out_dir}/grads.pt")


# The reference recipe again in other precisions and forms (tests/test_precision.py), one process group
# for all of them; the DeepSpeed tests compare their bf16 run with the bf16 case.
PRECISION_CASES = {
    "bf16": ["train.precision=bf16", "attack.precision=bf16"],
    "compiled": ["train.compile=true", "train.channels_last=true"],
    # fp16's first scale is far too large on purpose: the first steps overflow and must be skipped. (fp16
    # is emulated on this CPU, 7x slower than fp32: fewer images.)
    "fp16": ["train.precision=fp16", f"train.loss_scale={2.0 ** 20}", "data.subset=640"],
}
QUIET = ["eval.at_end=false", "train.checkpoint_every=0"]  # numbers unchanged; epoch checkpoints only


def _precision_case(rank, world, out_dir, name, extra):
    from dist_robust import dist as ddist
    from dist_robust.config import load_config
    from dist_robust.engine import train as engine
    ddist.setup_logging(rank == 0)
    cfg = load_config(QUICKSTART, [*REFERENCE, f"run.out_dir={out_dir}", f"run.name={name}", *QUIET, *extra])
    run = engine.setup(cfg, torch.device("cpu"))
    for epoch in range(cfg.train.epochs):
        engine.train_one_epoch(run, epoch)
    # parameters only: each rank's BN running statistics are its own until the export (engine/train.py)
    torch.save({k: v.clone() for k, v in run.model.named_parameters()}, f"{out_dir}/{name}.rank{rank}.pt")


@pytest.fixture(scope="session")
def precision_runs(tmp_path_factory) -> tuple[Path, dict]:
    """(folder, case -> the ranks' outcomes): each case's run folder and each rank's final parameters
    (``<case>.rank<r>.pt``) in that folder."""
    out = tmp_path_factory.mktemp("precision")
    return out, run_cases(_precision_case, 2, {name: (str(out), name, extra)
                                               for name, extra in PRECISION_CASES.items()}, out)


class Stop(BaseException):
    """Stands for the process dying: nothing in the engine catches it."""


def die_at_step(monkeypatch, n: int) -> None:
    """The n-th PGD-AT training loss raises Stop, as if the process died there (monkeypatch.undo revives it)."""
    from dist_robust.methods.pgd_at import PGDAdversarialTraining as PGDAT
    real, calls = PGDAT.loss, {"n": 0}

    def dying(self, model, x, y):
        calls["n"] += 1
        if calls["n"] == n:
            raise Stop
        return real(self, model, x, y)

    monkeypatch.setattr(PGDAT, "loss", dying)


def same_weights(a: Path, b: Path) -> bool:
    """Two safetensors files hold the same tensors bitwise."""
    from safetensors.torch import load_file
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def logged_step(run: Path) -> int:
    """The newest step a run's log.jsonl records (0 before it has one), for tests that act mid-run."""
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line).get("step", 0))
        except ValueError:
            pass  # a line being written
    return max(steps, default=0)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's ranks, say)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A real tmpfs mounted on ``folder`` with mount ``options`` (size=4m: a disk that fills; ro: a
    read-only file system) for the duration; the test is skipped where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def tiny():
    return list(TINY)
