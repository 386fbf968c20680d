"""Real 2-process gloo groups: exact sharded evaluation and DDP training agree with one rank."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import run_ranks, torchrun_cmd
from dist_robust import config
from dist_robust.data import load_dataset
from dist_robust.methods import build_method
from dist_robust.models import build_model

pytestmark = pytest.mark.multiproc  # every test here starts rank processes or launchers


def _model():
    info = load_dataset("digits", "test").info
    torch.manual_seed(1)
    return build_model("cnn3", info.channels, info.num_classes, info.mean, info.std)


def _starts_by_index(out_path=None):
    """Evaluate 101 digits points with PGD-1 in batches of 16 on this rank's shard, recording every
    random start evaluate() draws; returns them (rank 0: all ranks') in global index order."""
    from dist_robust import evaluate as ev
    real, drawn = ev._seeded_starts, {}

    def recording(x, first_index, *args):
        drawn[first_index] = real(x, first_index, *args)
        return drawn[first_index]
    ev._seeded_starts = recording
    try:
        ev.evaluate(_model(), load_dataset("digits", "test"), ["pgd-1"], eps=0.2, batch_size=16,
                    device=torch.device("cpu"), limit=101)
    finally:
        ev._seeded_starts = real
    gathered = [None] * dist.get_world_size() if dist.is_initialized() else [drawn]
    if dist.is_initialized():
        dist.all_gather_object(gathered, drawn)
    merged = {k: v for d in gathered for k, v in d.items()}
    return torch.cat([merged[k] for k in sorted(merged)])


def _starts_worker(rank, world, out_dir):
    starts = _starts_by_index()
    if rank == 0:
        torch.save(starts, os.path.join(out_dir, "starts.pt"))


def test_each_points_random_start_is_the_same_on_any_rank(tmp_path):
    """evaluate() seeds each point's start by its global index: 2 ranks (shards of 51 and 50 points,
    batches starting at other indices) draw for every point what 1 rank draws. The counts alone do
    not show this: PGD's outcome hardly depends on its start."""
    run_ranks(_starts_worker, 2, str(tmp_path))
    one, two = _starts_by_index(), torch.load(tmp_path / "starts.pt")
    assert one.shape == two.shape == (101, 1, 28, 28) and one.abs().max() > 0
    assert torch.equal(one, two)


def _ddp_step_worker(rank, world, out_dir):
    cfg = config.load_config("configs/quickstart.yaml", ["data.name=digits", "data.subset=null", "attack.eps=0.1",
                                                             "attack.steps=2"])
    model = _model()
    ddp = DDP(model)
    ds = load_dataset("digits", "train")
    torch.manual_seed(100 + rank)  # different data and attack noise per rank, as in training
    idx = torch.randperm(len(ds))[:16]
    x, y = ds.images[idx].float() / 255, ds.labels[idx]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss, _ = build_method(cfg).loss(ddp, x, y)
    loss.backward()
    opt.step()
    # Parameters only: BN running statistics are per rank between forwards (DDP broadcasts rank 0's
    # at the start of each forward, then every rank updates them with its own batch).
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        start = torch.cat([p.detach().flatten() for p in _model().parameters()])
        torch.save({"same": all(torch.equal(gathered[0], g) for g in gathered),
                    "moved": not torch.equal(start, flat)}, os.path.join(out_dir, "ddp.pt"))


def test_parameters_identical_on_both_ranks_after_a_ddp_step(tmp_path):
    run_ranks(_ddp_step_worker, 2, str(tmp_path))
    out = torch.load(tmp_path / "ddp.pt")
    assert out["moved"], "the step changed nothing"
    assert out["same"]


def test_torchrun_train_then_eval_on_one_and_two_ranks(reference, tmp_path):
    """The CLI end to end under torchrun (the shared reference run: 2 ranks train, results.json has the
    exact n); evaluating the same checkpoint on 1 rank and on 2 ranks (101 points: shards of unequal size, in
    batches of 16) gives identical counts."""
    res = json.loads((reference / "results.json").read_text())
    assert res["n"] == 101 and res["world_size"] == 2
    assert set(res) >= {"dataset", "split", "n", "world_size", "clean", "attacks", "checkpoint", "config"}
    assert set(res["attacks"]["pgd-3"]) >= {"correct", "acc", "eps", "norm", "steps"}
    assert (reference / "config.yaml").is_file() and (reference / "log.jsonl").is_file()
    ev = ["eval", "--checkpoint", str(reference), "--dataset", "digits", "--limit", "101",
          "--attacks", "clean,pgd-3", "--batch-size", "16"]
    # both at once: the single process mostly waits for its start-up while torchrun starts its ranks
    one = subprocess.Popen([sys.executable, "-m", "dist_robust", *ev, "--out", str(tmp_path / "one.json")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    two = subprocess.run(torchrun_cmd(*ev, "--out", str(tmp_path / "two.json")),
                         capture_output=True, text=True, timeout=300)
    one_out, _ = one.communicate(timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one_out[-2000:] + two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (a["world_size"], b["world_size"]) == (1, 2) and a["n"] == b["n"] == 101
    assert a["clean"] == {**b["clean"], "time_s": a["clean"]["time_s"]}
    assert a["attacks"]["pgd-3"]["correct"] == b["attacks"]["pgd-3"]["correct"] == res["attacks"]["pgd-3"]["correct"]
