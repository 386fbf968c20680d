"""Shared test helpers: real multi-process gloo groups on CPU, and tiny recipes."""
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TINY = [  # a recipe small enough for a test: digits, 1 epoch, 1-step PGD-AT
    "data.name=digits", "data.batch_size=64", "model.name=cnn3", "method.name=pgd_at",
    "attack.eps=0.1", "attack.steps=1", "optim.lr=0.05", "optim.schedule=multistep",
    "optim.milestones=[2]", "train.epochs=1", "train.log_every=5", "eval.limit=101",
    "eval.attacks=[clean,pgd-3]", "data.eval_batch_size=32",
]


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
        mp.start_processes(_entry, args=(world, init_file, fn, args), nprocs=world, start_method="spawn")
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)


@pytest.fixture
def tiny():
    return list(TINY)
