"""The DeepSpeed engine (engine/deepspeed.py) on 2 CPU ranks: it trains what DDP trains (ZeRO-0 from the
same seed, launched by launch/deepspeed.sh with a hostfile; ZeRO-2 from the same seed for every method,
TWINS with its synchronised adaptive wing), and its checkpoints are the project's format: DDP's continue
under ZeRO-2 and ZeRO-2's under DDP, ending where DDP ends."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENV, PRECISION_CASES, QUICKSTART, QUIET, REFERENCE, ROOT, torchrun_cmd, train_reference

pytestmark = pytest.mark.multiproc  # every test here starts rank processes or launchers


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


def _resume_from(out_dir: Path, checkpoint: Path, name: str, *extra, recipe: Path | None = None) -> Path:
    """A run folder holding only the epoch-1 checkpoint (and config.yaml) of the run in ``checkpoint``,
    trained on to the end: the reference recipe, or ``recipe`` (a resolved config.yaml) if given."""
    ckpts = out_dir / name / "checkpoints"
    ckpts.mkdir(parents=True)
    for f in (checkpoint / "checkpoints").glob("epoch_0001.*"):
        shutil.copy(f, ckpts / f.name)
    shutil.copy(checkpoint / "config.yaml", out_dir / name / "config.yaml")
    if recipe is None:
        return _train(out_dir, name, *extra)
    cmd = torchrun_cmd("train", str(recipe), f"run.out_dir={out_dir}", f"run.name={name}", *extra)
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    (out_dir / f"{name}.out").write_text(r.stdout + r.stderr)
    return out_dir / name


def _only_epoch_2(run: Path) -> None:
    """The run resumed from its epoch-1 checkpoint and trained epoch 2 alone."""
    out = (run.parent / f"{run.name}.out").read_text()
    assert "resumed from" in out and "epoch 2/2" in out and "epoch 1/2" not in out, out[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reference):
    tmp = tmp_path_factory.mktemp("engines")
    return {"ddp": reference,
            "zero0": _train(tmp, "zero0", "dist.zero_stage=0", launcher="deepspeed.sh"),
            # DDP's first epoch continued under ZeRO-2: each rank takes its slice of every momentum buffer,
            # and the epoch-2 checkpoint assembles them again from both ranks' partitions
            "zero2": _resume_from(tmp, reference, "zero2", "dist.engine=deepspeed", "dist.zero_stage=2")}


@pytest.mark.parametrize("stage", ["zero0", "zero2"])
def test_deepspeed_ends_where_ddp_ends(runs, stage):
    """ZeRO-0 from the same seed, ZeRO-2 from DDP's epoch-1 checkpoint (ZeRO-2 from the seed: every
    method, below)."""
    if stage == "zero2":
        _only_epoch_2(runs[stage])
    ddp, ds = load_file(runs["ddp"] / "model.safetensors"), load_file(runs[stage] / "model.safetensors")
    # BN running statistics too: the engine copies rank 0's buffers at each training forward, as DDP does
    _close(ddp, ds, f"{stage} model")
    first = load_file(runs["ddp"] / "checkpoints/epoch_0001.safetensors")
    assert all(not torch.equal(first[k], v) for k, v in ddp.items() if k.endswith("weight")), "the weights stood still"
    # the optimizer's state is saved per parameter, whatever ZeRO partitioned
    m_ddp, m_ds = _momentum(runs["ddp"], 2), _momentum(runs[stage], 2)
    assert m_ddp and all(v.abs().sum() > 0 for v in m_ddp.values())
    _close(m_ddp, m_ds, f"{stage} momentum")


def test_zero2_in_bf16_ends_where_ddp_in_bf16_ends(precision_runs, tmp_path):
    """bf16 under ZeRO-2 trains the same parameters bitwise as DDP's bf16 run (weights, gradient reduction
    and BN statistics in fp32 under both). On CUDA DeepSpeed switches an outer autocast off inside its
    forward unless its own torch_autocast section asks for it: the run's DeepSpeed config does."""
    from dist_robust.config import load_config
    from dist_robust.engine.deepspeed import ds_config
    section = ds_config(load_config(QUICKSTART, PRECISION_CASES["bf16"]), 32)["torch_autocast"]
    assert section == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    out, outcomes = precision_runs
    assert outcomes["bf16"] == ["ok", "ok"], outcomes["bf16"]
    run = _train(tmp_path, "zero2_bf16", "dist.engine=deepspeed", "dist.zero_stage=2",
                 *PRECISION_CASES["bf16"])
    ddp, ds = torch.load(out / "bf16.rank0.pt"), load_file(run / "model.safetensors")
    assert all(torch.equal(ddp[k], ds[k]) for k in ddp)


# Every method of the project, two steps each, as the stages of one recipe: one launch per engine.
EVERY_METHOD = """
data: {name: digits, subset: 128, batch_size: 64}
model: {name: cnn3}
attack: {eps: 0.1, steps: 1}
optim: {lr: 0.05}
train: {epochs: 1}
eval: {at_end: false}
stages:
  - {name: standard, method: {name: standard}}
  - {name: pgd_at, method: {name: pgd_at}, train: {epochs: 2}}
  - {name: trades, method: {name: trades}}
  - {name: mart, method: {name: mart}}
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


def test_a_zero2_checkpoint_continues_under_ddp(every_method, tmp_path):
    """ZeRO-2's epoch-1 checkpoint of the 2-epoch pgd_at stage (momentum assembled from both ranks'
    partitions) continues under DDP to where DDP's own run of that stage ends."""
    stage = every_method["zero2"] / "pgd_at"
    resumed = _resume_from(tmp_path, stage, "zero2_then_ddp", "dist.engine=ddp", recipe=stage / "config.yaml")
    _only_epoch_2(resumed)
    _close(load_file(every_method["ddp"] / "pgd_at" / "model.safetensors"),
           load_file(resumed / "model.safetensors"), "DDP from ZeRO-2")


def test_one_process_without_a_launcher_trains_under_zero2(tmp_path):
    """A plain `dist-robust train` (no torchrun: no rendezvous variables, no LOCAL_RANK) with DeepSpeed:
    the run makes its own one-process group (DeepSpeed's would look for MPI) and trains and evaluates."""
    from conftest import TINY
    r = subprocess.run([sys.executable, "-m", "dist_robust", "train", QUICKSTART, *TINY, "eval.attacks=[clean]",
                        "dist.engine=deepspeed", "dist.zero_stage=2", f"run.out_dir={tmp_path}", "run.name=alone"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.loads((tmp_path / "alone" / "results.json").read_text())["world_size"] == 1


def _adamw_bridge_worker(rank, world, out_dir):
    """A tiny model trained by torch's AdamW under ZeRO-2 (each parameter's state split between the two
    ranks' partitions): its state through the project's checkpoint into a second engine, before that
    engine's first step, and on from there."""
    import os
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["LOCAL_RANK"] = str(rank)
    import deepspeed
    from torch import nn

    from dist_robust.checkpoint import load_optimizer, save_checkpoint
    from dist_robust.config import load_config
    from dist_robust.engine.deepspeed import ZeroOptimizerState, ds_config
    config = ds_config(load_config(QUICKSTART, ["dist.engine=deepspeed", "dist.zero_stage=2"]), 4)

    def engine(weights=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))  # 66 values: the first weight split between the ranks
        if weights is not None:
            model.load_state_dict(weights)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        groups = [list(g["params"]) for g in opt.param_groups]
        wrapped, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        return wrapped, ZeroOptimizerState(ds_opt, groups)

    def step(wrapped, i):
        g = torch.Generator().manual_seed(10 * i + rank)
        x, y = torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)
        wrapped.backward(((wrapped(x) - y) ** 2).mean())
        wrapped.step()

    def assert_equal(a, b):
        as_saved = lambda groups: json.loads(json.dumps(groups))  # the sidecar's JSON: betas a list
        assert as_saved(a["param_groups"]) == as_saved(b["param_groups"])
        assert a["state"].keys() == b["state"].keys()
        for i in a["state"]:
            assert a["state"][i].keys() == b["state"][i].keys(), (a["state"][i].keys(), b["state"][i].keys())
            for k, v in a["state"][i].items():
                assert torch.equal(v, b["state"][i][k]), f"state {i}.{k}"

    a, state_a = engine()
    assert state_a.state_dict()["state"] == {}  # before the first step, as torch's (no state yet)
    for i in range(2):
        step(a, i)
    saved = state_a.state_dict()  # a collective: every rank assembles every parameter's state
    assert all(s.keys() == {"step", "exp_avg", "exp_avg_sq"} and s["step"].item() == 2
               and s["exp_avg"].shape == p.shape for s, p in zip(saved["state"].values(), a.module.parameters()))
    if rank == 0:
        save_checkpoint(Path(out_dir), "adamw", a.module.state_dict(), {"step": 2}, saved)
    torch.distributed.barrier()

    # torch's own AdamW takes the checkpoint as it is (what a DDP run resuming it loads)
    plain = torch.optim.AdamW(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).parameters())
    load_optimizer(Path(out_dir) / "adamw.json", plain)
    assert_equal(plain.state_dict(), saved)

    b, state_b = engine({k: v.clone() for k, v in a.module.state_dict().items()})
    load_optimizer(Path(out_dir) / "adamw.json", state_b)  # before b's first step
    assert_equal(state_b.state_dict(), saved)
    step(a, 2), step(b, 2)  # the restored state is the one b's optimizer steps with
    assert all(torch.equal(p, q) for p, q in zip(a.module.parameters(), b.module.parameters()))
    assert_equal(state_b.state_dict(), state_a.state_dict())
    assert state_b.state_dict()["state"][0]["step"].item() == 3


def test_zero2_optimizer_state_round_trips_adamw_bitwise(tmp_path):
    """The ZeRO bridge is DeepSpeed's public full-state API, for any torch optimizer: AdamW's moments and
    step count, assembled from two ranks' partitions into the checkpoint, restored into a fresh ZeRO-2
    engine (and into torch's AdamW), continue bitwise."""
    from conftest import run_ranks
    run_ranks(_adamw_bridge_worker, 2, str(tmp_path))
