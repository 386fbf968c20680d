"""One writer per run folder: ``<run folder>/.lock`` (pid, host, start time, the launch's id).

Rank 0 takes the lock before any rank writes anything and removes it when the command ends; a second
``train`` into the same folder exits 2 naming the holder. The ranks of one launch share an id (torchrun's
run id, slurm's job and step, another launcher's rendezvous address, else the process id), so the other ranks of the launch that holds the lock
go on, and a rank restarted by ``torchrun --max-restarts`` takes its own launch's lock over. A lock whose
process is gone (same host) is taken over with a warning; on another host its holder cannot be checked,
so the line says which file to delete once that job is known to be gone.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from .utils import ConfigError

LOCK = ".lock"
log = logging.getLogger("dist_robust")


def launch_id() -> str:
    """The same string on every rank of one launch, and another one for another launch."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        return f"torchrun:{env['TORCHELASTIC_RUN_ID']}"
    if "SLURM_JOB_ID" in env:
        return f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}"
    if int(env.get("WORLD_SIZE", 1)) > 1 and "MASTER_ADDR" in env and "MASTER_PORT" in env:
        # another launcher (DeepSpeed's): its rendezvous, which no concurrent launch can share
        return f"rendezvous:{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    return f"pid:{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        held = json.loads(path.read_text())
        return held if isinstance(held, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn or foreign: treated as a holder that cannot be checked


def _refuse(folder: Path, held: dict) -> ConfigError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
    return ConfigError(f"run folder {folder} is in use by pid {held.get('pid', '?')} on {held.get('host', '?')} "
                       f"(since {since}): choose another run.name, or delete {folder / LOCK} if that job is gone")


def _stale(held: dict) -> bool:
    """A holder on this host whose process is gone."""
    pid = held.get("pid")
    return held.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def check(folder: Path) -> None:
    """For the ranks other than 0: refuse (exit 2) when another launch's live process holds the folder."""
    held = _holder(Path(folder) / LOCK)
    if held is not None and held.get("launch") != launch_id() and not _stale(held):
        raise _refuse(Path(folder), held)


def acquire(folder: Path) -> Path:
    """Rank 0: take the folder's lock (creating the folder), or raise ConfigError naming its holder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "launch": launch_id()}
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            held = _holder(path)
            if held is None:
                continue  # released meanwhile
            if held.get("launch") != launch_id() and not _stale(held):
                raise _refuse(folder, held) from None
            if held.get("launch") != launch_id():
                log.warning("taking over the lock of %s: its process %s on %s is gone", folder, held.get("pid"),
                            held.get("host"))
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        return path
    raise _refuse(folder, _holder(path) or {})


def release(path: Path) -> None:
    """Remove the lock if it is still this process's."""
    held = _holder(path)
    if held and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
