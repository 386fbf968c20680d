"""A run folder is bound to what trained it: run again under the same run.name, a config that changes a
training key is refused in one line (a sweep that keeps a recipe's name must not "resume" a finished
run and relabel its results); keys that may change on resume (evaluation, logging, paths, the engine)
continue it, and results.json records which trained config its model comes from."""
import hashlib
import json

from conftest import QUICKSTART, TINY
from dist_robust.cli import main
from dist_robust.config import Config, training_changes


def test_training_changes_leave_out_the_keys_a_resume_may_change():
    old, new = Config(), Config()
    new.optim.lr, new.data.subset = old.optim.lr / 2, 1024
    new.eval.attacks, new.train.log_every, new.run.out_dir, new.dist.engine = ["clean"], 3, "elsewhere", "deepspeed"
    assert training_changes(old.to_dict(), new.to_dict()) == [
        "data.subset None -> 1024", f"optim.lr {old.optim.lr} -> {old.optim.lr / 2}"]


def _files(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_sweep_that_reuses_a_run_name_is_refused_and_an_evaluation_change_continues(tmp_path, capsys):
    run = ["train", QUICKSTART, *TINY, "data.subset=512", f"run.out_dir={tmp_path}", "run.name=sweep"]
    assert main(run) == 0
    folder = tmp_path / "sweep"
    before = _files(folder)
    capsys.readouterr()

    # the case: other data and lr under the same name; and a longer schedule
    for change, named in ((["data.subset=1024", "optim.lr=0.1"], ["data.subset 512 -> 1024", "optim.lr 0.05 -> 0.1"]),
                          (["train.epochs=2"], ["train.epochs 1 -> 2", "model.init_from="])):
        assert main([*run, *change]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(n in err for n in named), err
        assert "choose another run.name, or train.resume=never" in err
        assert _files(folder) == before  # nothing trained, rewritten or relabelled

    # evaluation settings may change: the finished model is evaluated again, nothing trained
    assert main([*run, "eval.attacks=[clean]", "train.log_every=2"]) == 0
    assert "epoch 1/1" not in capsys.readouterr().err
    results = json.loads((folder / "results.json").read_text())
    model = json.loads((folder / "model.json").read_text())
    assert list(results["attacks"]) == [] and results["config"]["eval"]["attacks"] == ["clean"]
    canonical = json.dumps(model["config"], sort_keys=True, separators=(",", ":")).encode()
    assert results["config_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert results["model_sha256"] == model["sha256"]["model"]
    assert training_changes(model["config"], results["config"]) == []
