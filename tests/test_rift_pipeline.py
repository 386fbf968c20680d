"""RiFT end to end as a staged recipe (methods/rift/): robust source -> MRC -> fine-tune only the
lowest-MRC module on clean data -> interpolate and pick alpha on held-out training images."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_robust.cli import main
from dist_robust.data import holdout_split, load_dataset

STAGES = [
    {"name": "source", "method": {"name": "pgd_at"}},
    {"name": "mrc", "kind": "rift_mrc", "model": {"init_from": "previous"},
     "stage": {"mrc_points": 64, "mrc_epochs": 2, "mrc_batch_size": 32}},
    {"name": "finetune", "method": {"name": "standard"},
     "model": {"init_from": "previous", "new_head": False, "trainable": "modules", "modules": ["lowest_mrc"],
               "frozen_bn": "train"}},
    {"name": "interpolate", "kind": "rift_interpolate",
     "model": {"init_from": "previous"},
     "stage": {"robust_from": "stage:source", "alphas": [0.0, 0.5, 1.0], "select_attack": "pgd-2"}},
]


@pytest.mark.slow
def test_rift_pipeline_tunes_one_module_and_picks_alpha_on_held_out_images(tmp_path, tiny):
    recipe = tmp_path / "rift.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"holdout": 200},
        "stages": STAGES}))
    overrides = [o for o in tiny if not o.startswith("method.")] + [f"run.out_dir={tmp_path}", "run.name=rift"]
    assert main(["train", str(recipe), *overrides]) == 0
    folder = tmp_path / "rift"

    table = json.loads((folder / "mrc" / "mrc.json").read_text())["modules"]
    assert [r["mrc"] for r in table] == sorted(r["mrc"] for r in table) and (folder / "mrc" / "mrc.png").is_file()
    lowest = table[0]["module"]
    robust = load_file(folder / "source" / "model.safetensors")
    assert all(torch.equal(robust[k], v) for k, v in load_file(folder / "mrc" / "model.safetensors").items())

    tuned = load_file(folder / "finetune" / "model.safetensors")
    moved = {k for k in robust if robust[k].is_floating_point() and not torch.equal(robust[k], tuned[k])}
    params = {k for k in moved if not k.endswith(("running_mean", "running_var"))}
    assert params and all(k.startswith(lowest + ".") for k in params)  # only the chosen module trained
    assert any(k.endswith("running_mean") for k in moved)  # BN statistics drift, as in the authors' code

    curve = json.loads((folder / "interpolate" / "alpha_curve.json").read_text())
    assert [c["alpha"] for c in curve["curve"]] == [0.0, 0.5, 1.0] and all(c["n"] == 200 for c in curve["curve"])
    assert curve["chosen"] in (0.0, 0.5, 1.0)
    floor = curve["curve"][0]["robust"]
    ok = [c for c in curve["curve"] if c["robust"] >= floor]
    assert curve["chosen"] == max(ok, key=lambda c: (c["clean"], -c["alpha"]))["alpha"]
    chosen = load_file(folder / "interpolate" / "model.safetensors")
    a = curve["chosen"]
    w = next(k for k in params)
    assert torch.allclose(chosen[w], a * tuned[w] + (1 - a) * robust[w])
    assert (folder / "interpolate" / "results.json").is_file()


def test_holdout_is_disjoint_stratified_and_seed_free():
    train = load_dataset("digits", "train")
    rest, val = holdout_split(train, 200)
    assert len(rest) + len(val) == len(train) and len(val) == 200
    seen = {tuple(x.flatten().tolist()) for x in val.images}
    assert not any(tuple(x.flatten().tolist()) in seen for x in rest.images[:300])
    assert torch.bincount(val.labels, minlength=10).min() >= 200 // 10 - 1
    assert torch.equal(holdout_split(train, 200)[1].labels, val.labels)
