"""The DeepSpeed engine (engine/deepspeed.py) on 2 CPU ranks: from the same seed it trains what DDP trains
(ZeRO 0 and 2 for PGD-AT; ZeRO-2 for every method, TWINS with its synchronised adaptive wing), its
checkpoints are the project's format and resume under DDP and back, and launch/deepspeed.sh runs it
with a hostfile."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENV, QUICKSTART, REFERENCE, ROOT, train_reference

pytestmark = pytest.mark.multiproc  # every test here starts rank processes or launchers

QUIET = ["eval.at_end=false", "train.checkpoint_every=0"]  # numbers unchanged; epoch checkpoints only


def _train(tmp_path, name, *extra, launcher="torchrun"):
    """The shared reference recipe (conftest.REFERENCE) under another engine or launcher."""
    if launcher == "torchrun":
        return train_reference(tmp_path, name, *QUIET, *extra)
    # launch/deepspeed.sh with a one-host hostfile (it adds dist.engine=deepspeed)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cmd = [str(ROOT / "launch" / "deepspeed.sh"), QUICKSTART, *REFERENCE, f"run.out_dir={tmp_path}",
           f"run.name={name}", *QUIET, *extra]
    env = {**ENV, "HOSTFILE": str(hostfile), "DIST_ROBUST_PYTHON": sys.executable, "MASTER_PORT": "29731"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return tmp_path / name


def _close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-5), \
            f"{what}: {k} differs by {(a[k].double() - b[k].double()).abs().max():.3g}"


def _momentum(run: Path, epoch: int) -> dict:
    train = load_file(run / "checkpoints" / f"epoch_{epoch:04d}.train.safetensors")
    return {k: v for k, v in train.items() if k.endswith("momentum_buffer")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reference):
    tmp = tmp_path_factory.mktemp("engines")
    return {"ddp": reference,
            "zero0": _train(tmp, "zero0", "dist.zero_stage=0", launcher="deepspeed.sh"),
            "zero2": _train(tmp, "zero2", "dist.engine=deepspeed", "dist.zero_stage=2")}


@pytest.mark.parametrize("stage", ["zero0", "zero2"])
def test_deepspeed_reaches_ddps_parameters_from_the_same_seed(runs, stage):
    ddp, ds = load_file(runs["ddp"] / "model.safetensors"), load_file(runs[stage] / "model.safetensors")
    # BN running statistics too: the engine copies rank 0's buffers at each training forward, as DDP does
    _close(ddp, ds, f"{stage} model")
    first = load_file(runs["ddp"] / "checkpoints/epoch_0001.safetensors")
    assert all(not torch.equal(first[k], v) for k, v in ddp.items() if k.endswith("weight")), "the weights stood still"
    # the optimizer's state is saved per parameter, whatever ZeRO partitioned
    m_ddp, m_ds = _momentum(runs["ddp"], 2), _momentum(runs[stage], 2)
    assert m_ddp and all(v.abs().sum() > 0 for v in m_ddp.values())
    _close(m_ddp, m_ds, f"{stage} momentum")


def _resume_from(tmp_path, source: Path, name: str, *extra) -> Path:
    """A run folder holding only ``source``'s first-epoch checkpoint, trained on to the end."""
    ckpts = tmp_path / name / "checkpoints"
    ckpts.mkdir(parents=True)
    for f in (source / "checkpoints").glob("epoch_0001.*"):
        shutil.copy(f, ckpts / f.name)
    shutil.copy(source / "config.yaml", tmp_path / name / "config.yaml")
    return _train(tmp_path, name, *extra)


def test_checkpoints_resume_across_engines(runs, tmp_path):
    # ZeRO-2's checkpoint (momentum assembled from both ranks' partitions) continues under DDP ...
    to_ddp = _resume_from(tmp_path, runs["zero2"], "zero2_then_ddp")
    _close(load_file(runs["ddp"] / "model.safetensors"), load_file(to_ddp / "model.safetensors"), "DDP from ZeRO-2")
    # ... and DDP's continues under ZeRO-2 (each rank takes its slice of every momentum buffer)
    to_zero2 = _resume_from(tmp_path, runs["ddp"], "ddp_then_zero2", "dist.engine=deepspeed", "dist.zero_stage=2")
    _close(load_file(runs["ddp"] / "model.safetensors"), load_file(to_zero2 / "model.safetensors"), "ZeRO-2 from DDP")


# Every method of the project, two steps each, as the stages of one recipe: one launch per engine.
EVERY_METHOD = """
data: {name: mnist, subset: 128, batch_size: 64}
model: {name: cnn3}
attack: {eps: 0.1, steps: 1}
optim: {lr: 0.05}
train: {epochs: 1}
eval: {at_end: false}
stages:
  - {name: standard, method: {name: standard}}
  - {name: pgd_at, method: {name: pgd_at}}
  - {name: trades, method: {name: trades}}
  - {name: twins_at, method: {name: twins_at}, model: {init_from: stage:standard, sync_bn: true}}
  - {name: twins_trades, method: {name: twins_trades}, model: {init_from: stage:standard, sync_bn: true}}
  - {name: cartl, method: {name: cartl}}
  - {name: cartl_ft, method: {name: cartl_ft}, model: {init_from: previous, last_k: 1}}
  - {name: partial, method: {name: pgd_at}, model: {init_from: stage:pgd_at, trainable: last_k, last_k: 1}}
  - {name: adv_rotation, method: {name: adv_rotation}}
  - {name: adv_jigsaw, method: {name: adv_jigsaw, jigsaw_grid: 4, jigsaw_perms: 10}}
  - {name: adv_selfie, method: {name: adv_selfie, selfie_grid: 4}}
  - {name: adv_ss_ensemble, method: {name: adv_ss_ensemble, ensemble_tasks: [rotation, jigsaw, selfie],
                                     jigsaw_grid: 4, jigsaw_perms: 10, selfie_grid: 4}}
"""
STAGES = [line.split("name: ")[1].split(",")[0] for line in EVERY_METHOD.splitlines() if line.startswith("  - ")]


@pytest.fixture(scope="module")
def every_method(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    (tmp / "every_method.yaml").write_text(EVERY_METHOD)
    out = {}
    for engine, extra in (("ddp", []), ("zero2", ["dist.engine=deepspeed", "dist.zero_stage=2"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "dist_robust", "train", str(tmp / "every_method.yaml"), f"run.out_dir={tmp}", f"run.name={engine}",
               *extra]
        r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        out[engine] = tmp / engine
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_every_method_trains_alike_under_ddp_and_zero2(every_method, stage):
    ddp = load_file(every_method["ddp"] / stage / "model.safetensors")
    zero2 = load_file(every_method["zero2"] / stage / "model.safetensors")
    _close(ddp, zero2, stage)
