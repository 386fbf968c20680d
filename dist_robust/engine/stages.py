"""Multi-stage recipes: run a list of stage configs (config.load_stages) in order, in one process group.

Each stage writes its own folder (checkpoints, results) under the pipeline's folder and, when it has
finished, a ``stage.json`` marker. A restarted pipeline skips the stages that have their marker and
resumes the first unfinished one from its own checkpoints (``train.resume``), so a run killed
anywhere continues where it stopped.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from .. import dist
from ..config import Config
from ..data import load_split
from ..methods import STAGE_KINDS
from ..utils import atomic_write
from .train import train

log = logging.getLogger("dist_robust")


def stage_splits(cfg: Config) -> dict:
    """The splits a stage kind declared (``StageKind.splits``: its keys that name one), loaded from the
    run's ``data`` section: {split: Dataset}. Methods never import the data layer; this is how a stage
    gets its images."""
    names = {getattr(cfg.stage, key) for key in STAGE_KINDS[cfg.stage.kind].splits}
    return {split: load_split(cfg.data, split) for split in sorted(names)}


def run_stage(cfg: Config, device: torch.device):
    """One stage on every rank: the engine's training loop, or the run function of the kind a method
    registered (methods/base.py), handed the splits it declared."""
    if cfg.stage.kind == "train":
        return train(cfg, device)
    return STAGE_KINDS[cfg.stage.kind].run(cfg, device, stage_splits(cfg))


MARKER = "stage.json"


def stage_dir(cfg: Config) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


def run_stages(stages: list[Config], device: torch.device) -> None:
    for i, cfg in enumerate(stages, 1):
        marker = stage_dir(cfg) / MARKER
        if marker.is_file():  # every rank sees the same folder, so every rank skips the same stages
            log.info("stage %d/%d %s (%s): finished earlier, skipped", i, len(stages), cfg.run.name, cfg.stage.kind)
            continue
        log.info("stage %d/%d %s (%s)", i, len(stages), cfg.run.name, cfg.stage.kind)
        t0 = time.perf_counter()
        run_stage(cfg, device)
        if dist.is_main():
            atomic_write(marker, json.dumps({"stage": i, "kind": cfg.stage.kind, "seconds": time.perf_counter() - t0,
                                             "config": cfg.to_dict()}, indent=1).encode())
        dist.barrier()
