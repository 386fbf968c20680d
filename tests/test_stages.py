"""Multi-stage recipes (config.load_stages, engine/stages.py): every stage validated up front, each
stage in its own folder, ``init_from: previous`` chaining, and a pipeline killed between stages
resumes with the next stage and ends as an unbroken one."""
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_robust.cli import main
from dist_robust.config import ConfigError, load_config, load_stages
from dist_robust.preflight import preflight

STAGES = [{"name": "clean", "method": {"name": "standard"}},
          {"name": "robust", "model": {"init_from": "previous"}, "method": {"name": "pgd_at"}}]


def _recipe(tmp_path, stages, **base):
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"name": "digits"}, **base, "stages": stages}))
    return str(path)


def _overrides(tmp_path, tiny):  # overrides reach every stage: the stages choose their methods here
    return [*(o for o in tiny if not o.startswith("method.")), f"run.out_dir={tmp_path / 'runs'}", "run.name=pipe"]


def test_stages_share_the_base_chain_and_live_in_the_pipeline_folder(tmp_path, tiny):
    stages = load_stages(_recipe(tmp_path, STAGES), _overrides(tmp_path, tiny))
    folder = tmp_path / "runs" / "pipe"
    assert [(c.run.out_dir, c.run.name, c.method.name) for c in stages] == [
        (str(folder), "clean", "standard"), (str(folder), "robust", "pgd_at")]
    assert stages[0].model.init_from is None and stages[1].model.init_from == str(folder / "clean")
    assert all(c.data.name == "digits" and c.train.epochs == 1 for c in stages)  # base and overrides reach all


@pytest.mark.parametrize("stages, match", [
    ([{"name": "a", "model": {"init_from": "previous"}}], "first stage has no previous one"),
    ([{"name": "a"}, {"name": "b", "model": {"init_from": "stage:c"}}], "no earlier stage named 'c'"),
    ([{"name": "a"}, {"name": "a"}], "unique plain folder name"),
    ([{"name": "a", "kind": "bake"}], "stage.kind='bake': unknown stage kind"),
    ([{"name": "a"}, {"name": "b", "optim": {"momentum": 1.5}}], r"stages\[1\] \(b\): optim.momentum=1.5"),
    ([], "non-empty list"),
])
def test_bad_stage_lists_are_one_line_errors_before_anything_runs(tmp_path, tiny, stages, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_stages(_recipe(tmp_path, stages), _overrides(tmp_path, tiny))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="multi-stage recipe"):
        load_config(_recipe(tmp_path, STAGES))


@pytest.mark.slow
def test_pipeline_killed_between_stages_resumes_with_the_next_stage(tmp_path, tiny, capsys):
    recipe = _recipe(tmp_path, STAGES)
    assert main(["train", recipe, *_overrides(tmp_path, tiny)]) == 0
    folder = tmp_path / "runs" / "pipe"
    for stage in ("clean", "robust"):
        assert (folder / stage / "stage.json").is_file() and (folder / stage / "results.json").is_file()
    unbroken = load_file(folder / "robust" / "model.safetensors")
    first = (folder / "clean" / "model.safetensors").read_bytes()
    # Killed after the first stage finished: the second stage's folder never got written.
    shutil.rmtree(folder / "robust")
    capsys.readouterr()
    assert main(["train", recipe, *_overrides(tmp_path, tiny)]) == 0
    err = capsys.readouterr().err
    assert "stage 1/2 clean (train): finished earlier, skipped" in err and "stage 2/2 robust (train)" in err
    assert (folder / "clean" / "model.safetensors").read_bytes() == first
    resumed = load_file(folder / "robust" / "model.safetensors")
    assert all(torch.equal(unbroken[k], resumed[k]) for k in unbroken), "resumed pipeline differs"
    assert "initialised from " + str(folder / "clean") in err


@pytest.mark.parametrize("recipe", sorted(str(p) for p in __import__("pathlib").Path("configs").rglob("*.yaml")))
def test_every_shipped_recipe_loads(recipe):
    """Each recipe in configs/ is valid on 2 ranks; the only errors allowed are inputs this machine
    lacks: a source run not trained yet, or a user dataset / checkpoint (paper-scale recipes)."""
    try:
        preflight(load_stages(recipe), world_size=2)
    except ConfigError as e:
        assert "no such file or folder" in str(e) or "data.root" in str(e), str(e)


def test_the_engine_hands_a_stage_kind_the_splits_it_declares(tmp_path, tiny, monkeypatch):
    """The stage contract (methods never import the data layer): a kind's ``splits`` keys name splits,
    which the engine loads from the run's data section and passes to ``run(cfg, device, splits)``."""
    import dataclasses

    from dist_robust.data import load_split
    from dist_robust.engine.stages import run_stage
    from dist_robust.methods import STAGE_KINDS
    from dist_robust.methods.base import register_stage
    seen = {}
    kind = STAGE_KINDS["rift_mrc"]
    monkeypatch.setitem(STAGE_KINDS, "rift_mrc", dataclasses.replace(kind, run=lambda cfg, device, s: seen.update(s)))
    cfg = load_config(None, [*tiny, "stage.kind=rift_mrc", "model.init_from=x", "data.holdout=60",
                             "stage.mrc_split=val", f"run.out_dir={tmp_path}"])
    run_stage(cfg, torch.device("cpu"))
    val = load_split(cfg.data, "val")
    assert kind.splits == ("mrc_split",) and list(seen) == ["val"]
    assert torch.equal(seen["val"].images, val.images) and torch.equal(seen["val"].labels, val.labels)
    with pytest.raises(ValueError, match="not keys of MRCConfig"):
        register_stage("other", type(cfg.stage), splits=("no_such_key",))(lambda cfg, device, splits: None)
