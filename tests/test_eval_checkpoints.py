"""`dist-robust eval` of every checkpoint the project writes: epoch, step and exported models of every
method family (TWINS' two BN wings, CARTL's spectral norm, RiFT's stages), or a one-line refusal (exit 2)
that names the file to use (Adv-SS pretext models); and the near-chance warning at the end of a run."""
import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY, run_ranks
from dist_robust.cli import main
from dist_robust.config import load_config
from dist_robust.engine.train import chance_warning, exported_model
from dist_robust.models import build_model, load_state_strict

# One tiny pipeline (digits, 4 steps per stage) holds a checkpoint of every kind.
RECIPE = {
    "data": {"name": "digits", "subset": 128, "holdout": 32, "batch_size": 32},
    "model": {"name": "cnn3"},
    "attack": {"eps": 0.1, "steps": 1},
    "optim": {"lr": 0.05, "schedule": "constant"},
    "train": {"epochs": 1, "checkpoint_every": 2},
    "eval": {"attacks": ["clean", "pgd-2"], "limit": 32},
    "stages": [
        {"name": "src", "method": {"name": "pgd_at"}},
        {"name": "twins", "method": {"name": "twins_at"}, "model": {"init_from": "stage:src", "sync_bn": True}},
        {"name": "cartl_ft", "method": {"name": "cartl_ft"}, "model": {"init_from": "stage:src"}},
        {"name": "pretext", "method": {"name": "adv_rotation"}, "eval": {"at_end": False}},
        {"name": "mrc", "kind": "rift_mrc", "model": {"init_from": "stage:src"},
         "stage": {"mrc_points": 32, "mrc_epochs": 1}},
        {"name": "ft", "method": {"name": "standard"}, "model": {
            "init_from": "previous", "new_head": False, "trainable": "modules", "modules": ["lowest_mrc"]}},
        {"name": "interp", "kind": "rift_interpolate", "model": {"init_from": "previous"},
         "stage": {"robust_from": "stage:src", "alphas": [0.0, 1.0], "select_attack": "pgd-2"}},
    ],
}
EVAL = ["--dataset", "digits", "--limit", "32", "--attacks", "clean,pgd-2"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    recipe = out / "all.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    with pytest.MonkeyPatch.context() as mp:  # keep the step checkpoints that each epoch's own replaces
        mp.setattr("dist_robust.engine.train.remove_step_checkpoints", lambda folder: None)
        assert main(["train", str(recipe), f"run.out_dir={out}", "run.name=all", "train.threads=1"]) == 0
    return out / "all"


def _eval(sidecar, capsys):
    capsys.readouterr()
    rc = main(["eval", "--checkpoint", str(sidecar), *EVAL])
    return rc, capsys.readouterr().err


@pytest.mark.slow
def test_every_checkpoint_evaluates_or_is_refused_in_one_line_naming_the_model_to_use(pipeline, capsys):
    sidecars = sorted([*pipeline.glob("*/model.json"), *pipeline.glob("*/checkpoints/epoch_*.json"),
                       *pipeline.glob("*/checkpoints/step_*.json")])
    kinds = {(s.parent.name if s.name == "model.json" else s.parent.parent.name, s.name.split("_")[0]) for s in sidecars}
    for stage in ("src", "twins", "cartl_ft", "ft"):  # what must be covered
        assert {(stage, "epoch"), (stage, "step"), (stage, "model.json")} <= kinds
    assert {("mrc", "model.json"), ("interp", "model.json"), ("pretext", "epoch")} <= kinds
    failures = []
    for sidecar in sidecars:
        rc, err = _eval(sidecar, capsys)
        if "pretext" in sidecar.parts:  # its head predicts rotations: refused, the file to fine-tune named
            ok = (rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
                  and f"model.init_from={pipeline / 'pretext' / 'model.json'}" in err)
        else:  # results by the checkpoint, one file per checkpoint
            suffix = "" if sidecar.stem == "model" else f"-{sidecar.stem}"
            ok = rc == 0 and (sidecar.parent / f"eval-digits-test{suffix}.json").is_file()
        if not ok:
            failures.append(f"{sidecar.relative_to(pipeline)}: exit {rc}: {err.strip()[-300:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["twins", "cartl_ft"])
def test_last_epoch_checkpoint_evaluates_exactly_as_the_exported_model(pipeline, stage, capsys):
    """TWINS through its adaptive wing, CARTL with its spectral norm baked in: as the run's export."""
    epoch, final = pipeline / stage / "checkpoints" / "epoch_0001.json", pipeline / stage / "model.json"
    exported = load_file(final.with_suffix(".safetensors"))
    rebuilt = exported_model(epoch, torch.device("cpu")).state_dict()
    assert rebuilt.keys() == exported.keys()
    assert all(torch.equal(rebuilt[k], exported[k]) for k in exported)
    results = []
    for sidecar in (epoch, final):
        assert _eval(sidecar, capsys)[0] == 0
        suffix = "" if sidecar.stem == "model" else f"-{sidecar.stem}"
        r = json.loads((sidecar.parent / f"eval-digits-test{suffix}.json").read_text())
        results.append((r["n"], r["clean"]["correct"], r["attacks"]["pgd-2"]["correct"]))
    assert results[0] == results[1]


@pytest.mark.slow
def test_twins_checkpoint_holds_two_different_wings_and_a_plain_model_refuses_it_in_one_line(pipeline):
    """What makes the test above mean something: the epoch checkpoint is not a plain model's state, and
    its wings differ (an export of the frozen wing would not match)."""
    state = load_file(pipeline / "twins" / "checkpoints" / "epoch_0001.safetensors")
    key = "features.stage1.1.{}.running_mean"
    assert not torch.equal(state[key.format("frozen")], state[key.format("adaptive")])
    with pytest.raises(ValueError, match="does not fit") as e:
        load_state_strict(build_model("cnn3", 1, 10, [0.0], [1.0]), state, "cnn3")
    assert len(str(e.value)) < 500 and "\n" not in str(e.value)


def test_chance_warning():
    assert chance_warning(0.97, 10) is None and chance_warning(0.2, 10) is None
    assert "12.0% is near chance (1/10 = 10.0%)" in chance_warning(0.12, 10)
    assert chance_warning(0.54, 2) and not chance_warning(0.56, 2)


def test_a_run_that_learns_nothing_ends_with_a_warning(tmp_path, tiny, capsys):
    args = ["train", "configs/quickstart.yaml", *tiny, "data.subset=64", "train.threads=1",
            f"run.out_dir={tmp_path}", "run.name=short"]
    assert main(args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "near chance" in line]
    assert len(warnings) == 1 and "short: clean accuracy" in warnings[0]


def _train_worker(rank, world, out_dir):
    """Trains on 2 ranks and keeps the state of the model each rank evaluates at the end."""
    from dist_robust.engine import train as engine
    evaluate_run, seen = engine.evaluate_run, {}

    def spy(cfg, model, *args, **kwargs):
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        return evaluate_run(cfg, model, *args, **kwargs)

    engine.evaluate_run = spy
    cfg = load_config("configs/quickstart.yaml", [*TINY, "data.subset=256", "data.batch_size=32",
                                                  f"run.out_dir={out_dir}", "run.name=two"])
    engine.train(cfg, torch.device("cpu"))
    torch.save(seen, os.path.join(out_dir, f"evaluated{rank}.pt"))


@pytest.mark.multiproc
def test_every_rank_evaluates_the_exported_model_itself(tmp_path):
    """Each rank's BN statistics differ after its last step: results.json must be the evaluation of
    model.json (rank 0's), on every rank's shard."""
    run_ranks(_train_worker, 2, str(tmp_path))
    exported = load_file(tmp_path / "two" / "model.safetensors")
    for rank in (0, 1):
        evaluated = torch.load(tmp_path / f"evaluated{rank}.pt")
        assert evaluated.keys() == exported.keys()
        assert all(torch.equal(evaluated[k], exported[k]) for k in exported), f"rank {rank}"
