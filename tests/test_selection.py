"""The robust-overfitting guard and bounded checkpoints, on 2 ranks: validation on the held-out split
every eval.every epochs leaves training bitwise untouched, model_best is the best validated epoch and
eval.final=best evaluates it, only the last train.keep_checkpoints epoch checkpoints stay, and a
finished run started again changes nothing."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ENV, QUICKSTART, ROOT, TINY, run_cases, same_weights

pytestmark = pytest.mark.multiproc  # rank groups and the CLI in a subprocess

EPOCHS = 5
BASE = [*TINY, "data.subset=256", "data.holdout=150", f"train.epochs={EPOCHS}", "optim.lr=0.2",
        "optim.milestones=[4]", "eval.select_attack=pgd-2"]
CASES = {
    "plain": ["train.keep_checkpoints=0"],  # every epoch's checkpoint kept
    "guarded": ["eval.every=2", "train.keep_best=true", "eval.final=best"],  # the default: the last 2 kept
}


def _train(rank, world, out_dir, name, extra):
    from dist_robust import dist as ddist
    from dist_robust.config import load_config
    from dist_robust.engine.train import train
    ddist.setup_logging(rank == 0)
    train(load_config(QUICKSTART, [*BASE, *extra, f"run.out_dir={out_dir}", f"run.name={name}"]),
          torch.device("cpu"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("selection")
    outcomes = run_cases(_train, 2, {name: (str(out), name, extra) for name, extra in CASES.items()}, out)
    assert all(o == ["ok", "ok"] for o in outcomes.values()), outcomes
    return out


def _records(run, kind):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_validation_leaves_training_untouched(runs):
    for epoch in (4, 5):
        name = f"checkpoints/epoch_{epoch:04d}.safetensors"
        assert same_weights(runs / "plain" / name, runs / "guarded" / name), name


def test_only_the_last_checkpoints_and_model_best_stay(runs):
    plain = sorted(p.name for p in (runs / "plain" / "checkpoints").iterdir())
    assert len(plain) == 3 * EPOCHS  # keep_checkpoints=0: all (model, optimizer, sidecar each)
    assert sorted(p.name for p in (runs / "guarded" / "checkpoints").iterdir()) == [
        "epoch_0004.json", "epoch_0004.safetensors", "epoch_0004.train.safetensors",
        "epoch_0005.json", "epoch_0005.safetensors", "epoch_0005.train.safetensors",
        "model_best.json", "model_best.safetensors"]


def test_every_n_epochs_and_the_last_on_the_val_split(runs):
    val = _records(runs / "guarded", "val")
    assert [r["epoch"] for r in val] == [2, 4, 5]
    assert all(r["n"] == 150 and "pgd-2" in r["attacks"] for r in val)
    assert not _records(runs / "plain", "val")


def test_the_final_evaluation_is_the_best_validated_epoch(runs):
    val = {r["epoch"]: r["attacks"]["pgd-2"]["acc"] for r in _records(runs / "guarded", "val")}
    best = max(val, key=lambda e: (val[e], -e))  # the first of the best
    results = json.loads((runs / "guarded" / "results.json").read_text())
    sel = results["selection"]
    assert (sel["epoch"], sel["best"]["epoch"], sel["last"]["epoch"], sel["final"]) == (best, best, EPOCHS, "best")
    assert sel["best"]["acc"] == val[best] and sel["split"] == "val"
    model = json.loads((runs / "guarded" / "model.json").read_text())
    assert model["epoch"] == best
    assert same_weights(runs / "guarded" / "model.safetensors", runs / "guarded" / "checkpoints" / "model_best.safetensors")
    assert "selection" not in json.loads((runs / "plain" / "results.json").read_text())


def test_a_finished_run_started_again_changes_nothing(runs):
    folder = runs / "guarded"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    args = [*BASE, *CASES["guarded"], f"run.out_dir={runs}", "run.name=guarded"]
    r = subprocess.run([sys.executable, "-m", "dist_robust", "train", QUICKSTART, *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "finished earlier" in r.stderr + r.stdout
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
