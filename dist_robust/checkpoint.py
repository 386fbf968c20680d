"""Checkpoints: plain safetensors plus a JSON sidecar, written atomically, verified by hash.

A checkpoint ``checkpoints/epoch_0003`` (or ``step_00000150`` inside an epoch) is three files:
  epoch_0003.safetensors        the unwrapped model state_dict (plain keys: usable by eval and fine-tuning)
  epoch_0003.train.safetensors  the optimizer's tensors (momentum buffers), for exact resume
  epoch_0003.json               the sidecar: resolved config, epoch, step, per-rank RNG states, optimizer
                                hyper-parameters, metrics and the sha256 of both tensor files
Each file goes to a temp name, is fsynced and renamed; the sidecar comes last, so a checkpoint
without a sidecar is incomplete by construction and a corrupted tensor file fails its hash.
Nothing is ever unpickled.
"""
from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .utils import atomic_write, sha256

FORMAT = "dist_robust.checkpoint/1"
log = logging.getLogger("dist_robust")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or fails its hash; the message is one line."""


def rng_state() -> dict:
    """This rank's torch RNG states, JSON-safe (the attack's random start draws from them)."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    decode = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(state["cuda"]))


def _optimizer_tensors(sd: dict) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON (the rest)."""
    tensors, plain = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "state": plain}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if not key.startswith("state."):
            continue  # a rank's buffers (load_rank_buffers)
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["state"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: Path, stem: str, model_state: dict, sidecar: dict,
                    optimizer_state: Optional[dict] = None,
                    rank_buffers: Optional[list[dict]] = None) -> Path:
    """Write ``stem``'s files into ``folder`` (rank 0 only). Returns the sidecar path.
    ``optimizer_state``: a torch optimizer's state_dict (one entry per parameter, whatever the engine).
    ``rank_buffers``: every rank's module buffers, kept in the training file for exact resume (see
    ``load_rank_buffers``)."""
    folder = Path(folder)
    model_bytes = st_save({k: v.detach().cpu().contiguous() for k, v in model_state.items()})
    meta = dict(sidecar, format=FORMAT, model_file=f"{stem}.safetensors",
                sha256={"model": sha256(model_bytes)})
    if optimizer_state is not None:
        tensors, opt_meta = _optimizer_tensors(optimizer_state)
        for r, buffers in enumerate(rank_buffers or ()):
            tensors.update({f"rank{r}.{k}": v.detach().cpu().contiguous() for k, v in buffers.items()})
        train_bytes = st_save(tensors)
        meta.update(train_file=f"{stem}.train.safetensors", optimizer=opt_meta)
        meta["sha256"]["train"] = sha256(train_bytes)
        atomic_write(folder / meta["train_file"], train_bytes)
    atomic_write(folder / meta["model_file"], model_bytes)
    atomic_write(folder / f"{stem}.json", json.dumps(meta, indent=1).encode())
    return folder / f"{stem}.json"


def _tensors(path: Path, data: bytes) -> dict:
    """safetensors' parser: never executes anything; what it cannot parse is refused in one line."""
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"checkpoint file {path} is not a valid safetensors file: {e}") from None


def _read_verified(folder: Path, name: str, expected: str) -> bytes:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    data = path.read_bytes()
    if sha256(data) != expected:
        raise CheckpointError(f"checkpoint file {path} fails its sha256 check (truncated or corrupted)")
    return data


def read_sidecar(sidecar_path: Path) -> dict:
    try:
        meta = json.loads(Path(sidecar_path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint sidecar {sidecar_path} is unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{sidecar_path} is not a dist_robust checkpoint sidecar")
    return meta


def load_checkpoint(path: str | Path, optimizer: Optional[torch.optim.Optimizer] = None) -> tuple[dict, dict]:
    """Load and verify a checkpoint. ``path`` may be the sidecar, the model .safetensors, a
    checkpoints folder or a run folder (its exported model, else its last good checkpoint).
    Returns (model_state, sidecar); restores the optimizer when one is given."""
    sidecar = resolve(path)
    meta = read_sidecar(sidecar)
    state = _tensors(sidecar.parent / meta["model_file"],
                     _read_verified(sidecar.parent, meta["model_file"], meta["sha256"]["model"]))
    if optimizer is not None:
        load_optimizer(sidecar, optimizer)
    return state, meta


def load_optimizer(sidecar: Path, optimizer) -> None:
    """Restore ``optimizer`` (anything with torch's load_state_dict) from a training checkpoint's
    verified train file, without reading its model file."""
    meta = read_sidecar(sidecar)
    if "train_file" not in meta:
        raise CheckpointError(f"{sidecar} holds no optimizer state (an exported model?)")
    tensors = _tensors(sidecar.parent / meta["train_file"],
                       _read_verified(sidecar.parent, meta["train_file"], meta["sha256"]["train"]))
    _restore_optimizer(optimizer, tensors, meta["optimizer"])


def model_header(sidecar: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of a checkpoint's model file, from its safetensors header (no tensor read)."""
    meta = read_sidecar(sidecar)
    path = Path(sidecar).parent / meta["model_file"]
    try:
        with safe_open(path, framework="pt") as f:  # parses and checks the header; reads no tensor
            return {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError; OSError for a missing file
        raise CheckpointError(f"checkpoint file {path} is unreadable: {e}") from None


def load_rank_buffers(sidecar: Path, rank: int) -> dict:
    """The module buffers that ``rank`` had when the training checkpoint ``sidecar`` was written ({} if
    it holds none). Ranks' buffers differ between DDP steps (BN running statistics: DDP copies rank 0's
    at each forward, then every rank updates its own, which its next attack uses), so an exact resume
    restores each rank's own."""
    meta = read_sidecar(sidecar)
    if "train_file" not in meta:
        return {}
    path = Path(sidecar).parent / meta["train_file"]
    tensors = _tensors(path, _read_verified(path.parent, meta["train_file"], meta["sha256"]["train"]))
    prefix = f"rank{rank}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def resolve(path: str | Path) -> Path:
    """The sidecar a user's path stands for (see load_checkpoint)."""
    p = Path(path)
    if p.suffix == ".json" and p.is_file():
        return p
    if p.name.endswith(".safetensors"):
        sidecar = p.with_name(p.name[: -len(".safetensors")] + ".json")
        if sidecar.is_file():
            return sidecar
        raise CheckpointError(f"checkpoint {p} has no sidecar {sidecar.name}" if p.exists()
                              else f"checkpoint {p} not found")
    if p.is_dir():
        if (p / "model.json").is_file():
            return p / "model.json"
        found = last_good(p / "checkpoints" if (p / "checkpoints").is_dir() else p)
        if found is not None:
            return found
        raise CheckpointError(f"no complete checkpoint in {p}")
    if p.is_file():
        raise CheckpointError(f"{p} is not a dist_robust checkpoint (a .safetensors file with its .json sidecar, "
                              "or a run folder); other formats are never unpickled")
    raise CheckpointError(f"checkpoint {p} not found")


def _step_of(sidecar: Path) -> int:
    try:
        return int(json.loads(sidecar.read_text()).get("step", -1))
    except (OSError, ValueError, AttributeError, TypeError):
        return -1  # unreadable: tried last, where read_sidecar reports it


def _candidates(folder: Path, epochs_only: bool = False) -> list[Path]:
    """The training checkpoints' sidecars in ``folder``, newest (most steps; an epoch's before a step's) first."""
    candidates = [*Path(folder).glob("epoch_*.json"), *([] if epochs_only else Path(folder).glob("step_*.json"))]
    return sorted(candidates, key=lambda p: (_step_of(p), p.name.startswith("epoch_")), reverse=True)


def mid_epoch_layout(meta: dict) -> tuple:
    """(ranks, data.batch_size, data.subset, data.holdout) of a checkpoint's sidecar: a checkpoint written
    inside an epoch (``"batch" in meta``) continues exactly only under the same (each rank's RNG, buffers
    and place in the epoch's order)."""
    data = meta.get("config", {}).get("data", {})
    return len(meta.get("rng", [])), data.get("batch_size"), data.get("subset"), data.get("holdout")


def newest_sidecar(folder: Path) -> Optional[dict]:
    """The newest training checkpoint's sidecar in ``folder``, read without checking its tensor files
    (preflight's cheap look at where a run would resume; ``last_good`` verifies)."""
    for sidecar in _candidates(folder):
        try:
            return read_sidecar(sidecar)
        except CheckpointError:
            continue
    return None


def last_good(folder: Path, epochs_only: bool = False) -> Optional[Path]:
    """The newest training checkpoint in ``folder`` (``epoch_NNNN`` at epoch ends, ``step_NNNNNNNN``
    inside an epoch unless ``epochs_only``; newest = most steps) whose files pass their hashes; bad ones
    are reported and skipped, so a corrupted latest checkpoint falls back to the one before."""
    for sidecar in _candidates(folder, epochs_only):
        try:
            meta = read_sidecar(sidecar)
            _read_verified(sidecar.parent, meta["model_file"], meta["sha256"]["model"])
            if "train_file" in meta:
                _read_verified(sidecar.parent, meta["train_file"], meta["sha256"]["train"])
            return sidecar
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    return None


def _remove(sidecar: Path) -> None:
    """A checkpoint's files, the sidecar first: a checkpoint is never left looking complete without its
    tensors."""
    sidecar.unlink(missing_ok=True)
    for tensors in sidecar.parent.glob(sidecar.stem + ".*safetensors"):
        tensors.unlink(missing_ok=True)


def prune_epoch_checkpoints(folder: Path, keep: int) -> None:
    """Keep the last ``keep`` epoch checkpoints in ``folder`` (0: all); model_best is not one of them."""
    epochs = sorted(Path(folder).glob("epoch_*.json"))  # epoch_NNNN: the name's order is the epochs' order
    for sidecar in epochs[:-keep] if keep else ():
        _remove(sidecar)


def remove_step_checkpoints(folder: Path) -> None:
    """Delete the mid-epoch ``step_*`` checkpoints in ``folder`` (an epoch checkpoint supersedes them):
    the sidecar first, so a checkpoint is never left looking complete without its tensors."""
    for sidecar in Path(folder).glob("step_*.json"):
        _remove(sidecar)
