"""Process-group setup and the few collectives the project needs.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under a bare ``srun`` we fall
back to slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. Without either we run as one process and
never create a process group, so every helper here also works single-process.
"""
from __future__ import annotations

import gc
import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def read_env() -> DistEnv:
    """Rank layout from torchrun's environment, else slurm's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                       int(env.get("LOCAL_WORLD_SIZE", world)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS"]).split("(")[0]
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", 0)), int(tasks_per_node))
    return DistEnv(0, 1, 0, 1)


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_for(device: torch.device, requested: str = "auto") -> str:
    """The process group's backend for a run on ``device``. A CUDA run's group serves CPU tensors as well
    as CUDA ones (``cpu:gloo,cuda:nccl``): the engine sums host-side counts (epoch totals, evaluation and
    AutoAttack counts) and gathers objects over it, and an nccl-only group refuses CPU tensors ("No
    backend type associated with device type cpu"). ``gloo`` alone serves both kinds (slower on CUDA):
    it is the way for several ranks on one GPU, which nccl refuses ("Duplicate GPU detected")."""
    if requested == "gloo":
        return "gloo"
    if device.type == "cuda":
        return "cpu:gloo,cuda:nccl"
    if requested == "nccl":
        raise ValueError(f"dist.backend=nccl needs CUDA devices; this run is on {device.type}: use "
                         "dist.backend=auto (gloo on a CPU)")
    return "gloo"


def served_devices(backend: str) -> set[str]:
    """The device types a group made with ``backend`` serves: "cpu:gloo,cuda:nccl" -> {cpu, cuda}; a plain
    name serves the devices torch registers for it (gloo: cpu and cuda; nccl: cuda only)."""
    if ":" in backend:
        return {pair.split(":")[0].strip() for pair in backend.split(",")}
    return set(dist.Backend.backend_capability.get(backend.lower(), ()))


def first_host(nodelist: str) -> str:
    """The first host of a slurm node list ("gpu[07-09,12],cpu3" -> "gpu07"; zero padding kept; several
    bracket groups ("r[1-2]-n[01-04]" -> "r1-n01") each give their first value)."""
    first, depth = nodelist, 0
    for i, c in enumerate(nodelist):  # the first host expression: up to a comma outside brackets
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            first = nodelist[:i]
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], first.strip())


def rendezvous_env(env: DistEnv, environ=os.environ) -> None:
    """Fill in MASTER_ADDR / MASTER_PORT where a bare ``srun`` (no torchrun) gives none: the first host
    of the job's node list, so that every node meets at one address (127.0.0.1 would leave each node
    waiting for itself until the timeout), and a port from the job id. ValueError (one line) when a
    multi-node slurm step gives no node list to take it from."""
    if env.world_size == 1:
        return
    environ.setdefault("MASTER_PORT", str(29500 + int(environ.get("SLURM_JOB_ID", 0)) % 1000))
    if "MASTER_ADDR" in environ:
        return
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    several = int(environ.get("SLURM_STEP_NUM_NODES", environ.get("SLURM_NNODES", "1")) or 1) > 1
    if several and not nodes:
        raise ValueError(f"{env.world_size} slurm tasks over several nodes and no MASTER_ADDR: export "
                         "MASTER_ADDR (the first node's address) and MASTER_PORT, or launch with launch/slurm.sbatch")
    environ["MASTER_ADDR"] = first_host(nodes) if several else "127.0.0.1"


def init(env: DistEnv, device: torch.device, backend: str = "auto", timeout_s: int = 1800) -> None:
    """Join the process group when there is more than one rank (backend_for: gloo on CPU, gloo for CPU
    tensors and nccl for CUDA ones on GPUs)."""
    if env.world_size == 1 or dist.is_initialized():
        return
    backend = backend_for(device, backend)
    rendezvous_env(env)
    timeout = timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
    # torchrun --max-restarts keeps its store across restarts: without a per-attempt prefix the restarted
    # ranks can read the dead ranks' addresses from it and fail to connect ("Connection refused").
    store = dist.PrefixStore(f"dist_robust/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    # device_id binds nccl's communicator to this rank's GPU at once; gloo alone has nothing to bind
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout,
                            device_id=device if "nccl" in backend else None)


def init_alone(device: torch.device) -> None:
    """A group of this one process, serving what a run's group serves (backend_for): DeepSpeed needs a
    group even alone, and without one it makes its own (nccl only on a GPU; MPI discovery, failing without
    mpi4py, when no launcher set the rendezvous variables)."""
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)


def set_timeout(seconds: float) -> None:
    """The timeout of every later collective of the group (no-op with one process): the start-up's is long
    (compilation, data preparation, a first checkpoint), a training step's can be short, so that a rank
    that dies or hangs stops the others in minutes rather than half an hour."""
    if dist.is_initialized():
        # torch.distributed.set_timeout is public in newer torch; before, the private function it replaced
        setter = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
        setter(timedelta(seconds=seconds))


def cleanup(finished: bool = False) -> None:
    """Leave the process group. ``finished``: every rank got to the end of the run, so they leave it
    together (a barrier first), as torch's shutdown notes advise; garbage that may still hold the group
    (objects in reference cycles) is collected while it is alive. Before this, a rank of a successful
    2-rank run was seen to abort at exit ("terminate called without an active exception"), rarely; its
    cause is not known."""
    if not dist.is_initialized():
        return
    gc.collect()
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place, and return it (identity with one process). A group that does not
    serve the tensor's device (a caller's own nccl-only group around evaluate_model, say, and a CPU count)
    gets a copy on a device it serves."""
    if not dist.is_initialized():
        return t
    served = served_devices(dist.get_backend_config())
    if t.device.type in served:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t
    carried = t.to(torch.device(sorted(served)[0]))
    dist.all_reduce(carried, op=dist.ReduceOp.SUM)
    return t.copy_(carried)


def all_gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BN running statistics, ...) in ``module`` on every rank, in place."""
    if dist.is_initialized():
        with torch.no_grad():
            for b in module.buffers():
                dist.broadcast(b, src=0)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile's and DDP's (or DeepSpeed's) wrappers: attacks and checkpoints
    use it."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return getattr(model, "module", model)


def setup_logging(is_main_rank: bool) -> logging.Logger:
    """Rank 0 logs INFO to stderr; the other ranks only report errors. No print patching."""
    log = logging.getLogger("dist_robust")
    log.handlers.clear()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if is_main_rank else logging.ERROR)
    log.propagate = False
    return log
