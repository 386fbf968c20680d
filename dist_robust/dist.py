"""Process-group setup and the few collectives the project needs.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under a bare ``srun`` we fall
back to slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. Without either we run as one process and
never create a process group, so every helper here also works single-process.
"""
from __future__ import annotations

import gc
import logging
import os
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


def init(env: DistEnv, device: torch.device, backend: str = "auto", timeout_s: int = 1800) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU) when there is more than one rank."""
    if env.world_size == 1 or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    # Slurm without torchrun gives no rendezvous address: single node, or the user exports one.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", 0)) % 1000))
    timeout = timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
    # torchrun --max-restarts keeps its store across restarts: without a per-attempt prefix the restarted
    # ranks can read the dead ranks' addresses from it and fail to connect ("Connection refused").
    store = dist.PrefixStore(f"dist_robust/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)


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
    """Sum a tensor over ranks, in place, and return it (identity with one process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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
