"""The process group a run creates (dist.init): which devices' tensors it serves, where a bare srun
meets, the collectives the engine makes and the devices of their tensors, the timeout after the first
step, and a run folder that the nodes do not share."""
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from conftest import QUICKSTART, ROOT, RUN_ENV, TINY, launcher_env, run_ranks
from dist_robust import dist

# --- the group dist.init asks for -------------------------------------------------------------------

def _requested_group(monkeypatch, device: torch.device, backend: str = "auto") -> dict:
    """What dist.init passes to init_process_group for a 2-rank run on ``device``, the rendezvous and
    the group's creation intercepted (no GPU or peer needed)."""
    asked = {}
    monkeypatch.setattr(tdist, "rendezvous", lambda *a, **k: iter([(tdist.HashStore(), 0, 2)]))
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, **kw: asked.update(kw, backend=backend))
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    dist.init(dist.DistEnv(0, 2, 0, 2), device, backend)
    return asked


def test_a_cuda_runs_group_serves_cpu_and_cuda_tensors(monkeypatch):
    """The engine sums CPU tensors (epoch totals, evaluation and AutoAttack counts): an nccl-only group
    (what dist.backend=auto asked for on CUDA before) refuses them at the end of the first epoch."""
    cuda = torch.device("cuda", 0)
    for backend in ("auto", "nccl"):
        asked = _requested_group(monkeypatch, cuda, backend)
        assert dist.served_devices(asked["backend"]) == {"cpu", "cuda"}, asked["backend"]
        assert "nccl" in asked["backend"] and asked["device_id"] == cuda  # nccl carries the CUDA tensors
    asked = _requested_group(monkeypatch, cuda, "gloo")  # several ranks on one GPU: gloo carries both
    assert asked["backend"] == "gloo" and asked["device_id"] is None
    assert dist.served_devices("gloo") == {"cpu", "cuda"}
    assert _requested_group(monkeypatch, torch.device("cpu"))["backend"] == "gloo"
    with pytest.raises(ValueError, match="dist.backend=nccl needs CUDA"):
        dist.backend_for(torch.device("cpu"), "nccl")
    assert dist.served_devices("nccl") == {"cuda"}


# --- where a bare srun meets -------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, first", [
    ("gpu07", "gpu07"), ("gpu[07-09,12],cpu3", "gpu07"), ("a1,b[2-3]", "a1"), ("r[1-2]-n[01-04]", "r1-n01"),
    ("node[001,010]", "node001"), ("x-[9-10]y", "x-9y")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert dist.first_host(nodelist) == first


def test_a_bare_srun_over_nodes_meets_at_the_first_node():
    two = dist.DistEnv(0, 8, 0, 4)
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "1234"}
    dist.rendezvous_env(two, env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu07", "29734")
    env = {"SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu07"}
    dist.rendezvous_env(two, env)
    assert env["MASTER_ADDR"] == "127.0.0.1"
    env = {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "40000", "SLURM_NNODES": "2"}  # the user's own: kept
    dist.rendezvous_env(two, env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.5", "40000")
    with pytest.raises(ValueError, match="export MASTER_ADDR"):
        dist.rendezvous_env(two, {"SLURM_NNODES": "2"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _srun_tasks(tmp_path, args, cwds, nodelist="localhost,nodeb", nnodes="2") -> list[subprocess.CompletedProcess]:
    """Two plain processes with the environment a bare ``srun -n 2`` gives its tasks (no torchrun, no
    MASTER_ADDR): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the job's node list and id."""
    port = str(_free_port())  # the job id's port (29500 + id % 1000) may be taken here
    procs = []
    for rank, cwd in enumerate(cwds):
        env = launcher_env(**RUN_ENV, SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                           SLURM_NTASKS_PER_NODE="1" if nnodes == "2" else "2", SLURM_NNODES=nnodes,
                           SLURM_JOB_NODELIST=nodelist, SLURM_JOB_ID="7", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "dist_robust", *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out) for p, out in zip(procs, outs)]


@pytest.mark.multiproc
def test_a_bare_srun_over_two_nodes_trains_without_master_addr(tmp_path):
    """dist.read_env's slurm branch with real processes: two tasks of a 2-node job (the node list's first
    host is this machine) find each other at the address derived from the node list, train and evaluate
    as 2 ranks."""
    r = _srun_tasks(tmp_path, ["train", str(ROOT / QUICKSTART), *TINY, "eval.attacks=[clean]",
                               f"run.out_dir={tmp_path}", "run.name=srun"], [ROOT, ROOT])
    assert [p.returncode for p in r] == [0, 0], r[0].stdout[-3000:] + r[1].stdout[-3000:]
    res = json.loads((tmp_path / "srun" / "results.json").read_text())
    assert res["world_size"] == 2 and res["n"] == 101


@pytest.mark.multiproc
def test_a_run_folder_the_nodes_do_not_share_is_refused_in_one_line(tmp_path):
    """Each task in a folder of its own (a node-local run.out_dir): rank 1 does not see rank 0's lock, so
    both stop with exit 2 and one line naming rank 1 and the shared filesystem, instead of resuming from
    different points and waiting for each other."""
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for c in cwds:
        c.mkdir()
    r = _srun_tasks(tmp_path, ["train", str(ROOT / QUICKSTART), *TINY, "run.out_dir=runs", "run.name=local"], cwds,
                    nodelist="localhost", nnodes="1")
    assert [p.returncode for p in r] == [2, 2], r[0].stdout[-3000:] + r[1].stdout[-3000:]
    errors = [line for line in r[0].stdout.splitlines() if "error" in line]
    assert len(errors) == 1 and "rank 1" in errors[0] and "filesystem that every node shares" in errors[0], errors
    assert not (cwds[1] / "runs" / "local" / "config.yaml").exists()  # nothing trained or written


# --- the collectives the engine makes, and their tensors' devices -------------------------------------

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce", "all_to_all_single", "barrier", "all_gather_object", "broadcast_object_list")


def _record_collectives(seen: list):
    """Wrap torch.distributed's collectives (and the functional all_reduce of the synchronised BN) so that
    each call records (name, device type of its tensor or 'object')."""
    from dist_robust.models import sync_bn

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            kind = "object" if name.endswith("_object") or name.endswith("object_list") else None
            seen.append((name, kind or (tensors[0].device.type if tensors else "none")))
            return fn(*args, **kwargs)
        return recorded
    for name in COLLECTIVES:
        setattr(tdist, name, wrap(name, getattr(tdist, name)))
    sync_bn.all_reduce = wrap("functional.all_reduce", sync_bn.all_reduce)


def _audit_worker(rank, world, out_dir):
    from dist_robust.config import load_config
    from dist_robust.engine.train import train
    seen = []
    _record_collectives(seen)
    dist.setup_logging(rank == 0)
    cfg = load_config(QUICKSTART, [*TINY, "data.subset=256", "model.sync_bn=true", "eval.every=1", "eval.limit=24",
                                   "train.checkpoint_every=2", "eval.attacks=[clean,pgd-2,aa]", "data.holdout=32",
                                   f"run.out_dir={out_dir}", "run.name=audit"])
    train(cfg, torch.device("cpu"))
    served = dist.served_devices(tdist.get_backend_config())
    (Path(out_dir) / f"seen{rank}.json").write_text(json.dumps({"seen": seen, "served": sorted(served)}))


@pytest.mark.multiproc
def test_every_collective_of_a_run_uses_a_device_its_group_serves(tmp_path):
    """A 2-rank run through every kind of collective the engine makes (DDP training with synchronised BN,
    step checkpoints, validation, the export, clean / PGD / AutoAttack evaluation): each collective's tensor
    lives on a device the group serves; host-side sums are among them (what an nccl-only group refused)."""
    run_ranks(_audit_worker, 2, str(tmp_path))
    for rank in range(2):
        got = json.loads((tmp_path / f"seen{rank}.json").read_text())
        devices = {d for _, d in got["seen"]} - {"object", "none"}
        assert devices <= set(got["served"]), (devices, got["served"])
        names = {n for n, _ in got["seen"]}
        assert {"all_reduce", "broadcast", "functional.all_reduce", "all_gather_object", "barrier"} <= names, names
        assert ("all_reduce", "cpu") in map(tuple, got["seen"])


# --- the timeout after the first step ------------------------------------------------------------------

def _stuck_rank_worker(rank, world, out_dir):
    """Rank 1 takes 1.5 s in its first step (within the start-up timeout) and 4 s in its third (over the
    1 s step timeout): rank 0 must give up at the third step's collective, after about 1 s, not wait."""
    from dist_robust.config import load_config
    from dist_robust.engine import train as engine
    from dist_robust.methods.pgd_at import PGDAdversarialTraining as PGDAT
    real, calls = PGDAT.loss, {"n": 0}

    def slow(self, model, x, y):
        calls["n"] += 1
        if rank == 1 and calls["n"] in (1, 3):
            time.sleep(1.5 if calls["n"] == 1 else 4)
        return real(self, model, x, y)
    PGDAT.loss = slow
    cfg = load_config(QUICKSTART, [*TINY, "dist.step_timeout_s=1", "dist.timeout_s=60", "eval.at_end=false",
                                   f"run.out_dir={out_dir}", "run.name=stuck"])
    run = engine.setup(cfg, torch.device("cpu"))
    t0 = time.perf_counter()
    try:
        engine.train_one_epoch(run, 0)
        outcome = "finished"
    except Exception as e:  # the collective that timed out (rank 1: its peer gone)
        outcome = f"{type(e).__name__}"
    (Path(out_dir) / f"stuck{rank}.json").write_text(json.dumps({"outcome": outcome, "steps": calls["n"],
                                                                 "seconds": time.perf_counter() - t0}))


@pytest.mark.multiproc
def test_a_stuck_rank_stops_the_others_after_the_step_timeout(tmp_path):
    try:
        run_ranks(_stuck_rank_worker, 2, str(tmp_path))
    except Exception:
        pass  # a rank whose group broke may fail on leaving it; what it recorded is the test
    got = json.loads((tmp_path / "stuck0.json").read_text())
    assert got["outcome"] != "finished" and got["steps"] == 3, got
    assert got["seconds"] < 1.5 + 4, got  # the first step's 1.5 s were waited for, the third step's 4 s were not
