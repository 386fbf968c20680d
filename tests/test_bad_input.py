"""User mistakes beyond a config value's type (test_config.py has those): each exits with status 2 and
one line on stderr naming the thing, before any rank starts, and leaves an existing run untouched.
Also: loading a checkpoint never executes code. The README's troubleshooting section lists them."""
import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_robust.checkpoint import save_checkpoint
from dist_robust.cli import main
from dist_robust.models import build_model

RECIPE = "configs/quickstart.yaml"


def _checkpoint(folder: Path, name: str, channels: int = 1, classes: int = 10) -> str:
    """A model checkpoint as a run exports it (no training needed to be refused)."""
    model = build_model(name, channels, classes, (0.5,) * channels, (0.5,) * channels, image_size=28)
    save_checkpoint(folder, "model", model.state_dict(), dict(config={"model": {"name": name}}, epoch=1, step=1))
    return str(folder)


def _image_folder(root: Path, shape: tuple, other_size: int = 0) -> None:
    """Two classes of one tiny image each per split (grey for shape (H, W), RGB for (H, W, 3)); one more
    training image of ``other_size`` px if given."""
    from PIL import Image
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.fromarray(np.full(shape, 100, dtype=np.uint8)).save(root / split / cls / "0.png")
    if other_size:
        Image.fromarray(np.zeros((other_size, other_size), dtype=np.uint8)).save(root / "train" / "a" / "1.png")


@pytest.fixture
def world(tmp_path):
    """An existing run (its files must survive every mistake) and checkpoints to misuse."""
    run = tmp_path / "runs" / "existing"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name: cnn3}\ndata: {name: mnist}\nmethod: {name: pgd_at}\n")
    (run / "results.json").write_text('{"clean": {"acc": 0.9}}\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "blocker").write_text("a regular file where a folder would go\n")
    _image_folder(tmp_path / "grey_images", (8, 8))
    _image_folder(tmp_path / "rgb_images", (8, 8, 3))
    _image_folder(tmp_path / "two_sizes", (8, 8), other_size=10)
    return {"tmp": tmp_path, "run": run,
            "resnet": _checkpoint(tmp_path / "resnet_small", "resnet_small"),
            "rgb": _checkpoint(tmp_path / "rgb", "cnn3", channels=3),
            "c100": _checkpoint(tmp_path / "c100", "cnn3", classes=100)}


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# (arguments after `dist-robust`, environment, what the one line must name); {x} are world's paths
MISTAKES = [
    (["train", RECIPE, "attack.eps=8"], {}, "attack.eps=8"),                                   # 8 for 8/255
    (["train", RECIPE, "eval.eps=2"], {}, "eval.eps=2"),
    (["train", RECIPE, "model.init_from={resnet}"], {}, "holds a resnet_small model"),         # architecture
    (["train", RECIPE, "model.init_from={c100}", "model.new_head=false"], {}, "head has 100 classes"),
    (["train", RECIPE, "model.init_from={rgb}"], {}, "3-channel"),                             # channels
    (["train", RECIPE, "data.name=digits", "data.subset=null", "data.batch_size=2000"], {"WORLD_SIZE": "2000", "RANK": "0"},
     "fewer than the 2000 ranks"),                                                              # world > data
    (["train", RECIPE, "data.subset=100", "data.batch_size=128"], {}, "mnist has 100 here"),
    (["train", RECIPE, "data.holdout=60000"], {}, "data.holdout=60000"),
    (["train", RECIPE, "data.name=digits", "data.subset=1500"], {}, "data.subset=1500: more than the 1,437"),
    (["train", RECIPE, "data.name=cifar10", "data.root={tmp}/empty"], {}, "holds no cifar10 files"),
    (["train", RECIPE, "data.name=imagefolder", "data.root={tmp}/images"], {}, "train/<class>/"),
    # imagefolder's channels and size are its images': a source or a network that does not fit them is
    # refused here, not in the ranks (exit 1 with an empty run folder)
    (["train", RECIPE, "data.name=imagefolder", "data.root={tmp}/rgb_images", "model.init_from={c100}",
      "run.out_dir={tmp}/runs", "run.name=new"], {},
     "a model for 1-channel images; imagefolder has 3 (data.channels=1 converts them)"),
    (["train", RECIPE, "data.name=imagefolder", "data.root={tmp}/grey_images", "model.init_from={rgb}",
      "run.out_dir={tmp}/runs", "run.name=new"], {}, "a model for 3-channel images; imagefolder has 1"),
    (["train", RECIPE, "data.name=imagefolder", "data.root={tmp}/grey_images", "model.name=torchvision:resnet18",
      "run.out_dir={tmp}/runs", "run.name=new"], {}, "data.channels=3 converts the images"),
    (["train", RECIPE, "data.name=imagefolder", "data.root={tmp}/two_sizes", "run.out_dir={tmp}/runs",
      "run.name=new"], {}, "are 8x8, 10x10: set data.image_size"),
    (["train", RECIPE, "model.name=timm:vit_tiny_patch16_224", "run.out_dir={tmp}/runs", "run.name=new"], {},
     "a network for 224x224 images; mnist images are 28x28: set model.img_size=28"),
    (["train", RECIPE, "model.name=resnet_small", "run.out_dir={tmp}/runs", "run.name=existing"], {},
     "holds another run (model.name cnn3, here resnet_small)"),                                 # reused run name
    (["train", RECIPE, "method.name=twins_at", "model.init_from={c100}", "data.batch_size=6"],
     {"WORLD_SIZE": "2", "RANK": "0"},
     "per-rank batch (3) must be even"),
    (["train", RECIPE, "method.name=twins_trades"], {}, "model.init_from=None: method.name=twins_trades"),
    (["train", RECIPE, "train.checkpoint_every=-5"], {}, "train.checkpoint_every=-5"),
    (["train", RECIPE, "dist.engine=horovod"], {}, "dist.engine='horovod'"),
    (["train", RECIPE, "dist.engine=deepspeed", "dist.zero_stage=3"], {}, "dist.zero_stage=3"),     # not supported
    (["train", RECIPE, "train.precision=fp8"], {}, "train.precision='fp8'"),
    (["train", RECIPE, "dist.engine=deepspeed", "train.precision=fp16"], {}, "fp16 runs with dist.engine=ddp"),
    (["train", RECIPE, "dist.engine=deepspeed", "train.compile=true"], {}, "train.compile=True"),
    (["train", RECIPE, "method.name=adv_ss_ensemble", "eval.at_end=false", "train.precision=bf16"], {},
     "log-det penalty"),
    (["train", "{tmp}/no_such_recipe.yaml"], {}, "no_such_recipe.yaml"),
    (["eval", "--checkpoint", "{c100}", "--dataset", "mnist"], {}, "--dataset=mnist: 10 classes"),
    (["eval", "--checkpoint", "{tmp}/nothing_here", "--dataset", "mnist"], {}, "nothing_here"),
    (["eval", "--checkpoint", "{resnet}", "--dataset", "cifar10"], {}, "--root"),             # the flag, not data.root
    (["eval", "--checkpoint", "{resnet}", "--dataset", "mnist", "--eps", "4"], {}, "--eps=4.0"),
    (["eval", "--checkpoint", "{resnet}", "--dataset", "mnist", "--eps", "8/0"], {}, "--eps=8/0"),
    (["eval", "--model", "timm:resnet18", "--dataset", "mnist", "--eps", "8/255"], {}, "--weights"),
    # a checkpoint of ours given as an external model's weights: its sidecar names model and normalisation
    (["eval", "--model", "timm:resnet18", "--weights", "{resnet}/model.safetensors", "--dataset", "mnist"], {},
     "--weights={resnet}/model.safetensors: a dist_robust checkpoint (its sidecar names its model and "
     "normalisation): evaluate it with --checkpoint {resnet}/model.safetensors, without --model"),
    (["eval", "--model", "timm:resnet18", "--weights", "{resnet}/model.json", "--dataset", "mnist"], {},
     "--checkpoint {resnet}/model.json"),
    (["eval", "--model", "timm:resnet18", "--weights", "{resnet}", "--dataset", "mnist"], {}, "--checkpoint {resnet}"),
    # the robust-overfitting guard never selects on the test split
    (["train", RECIPE, "eval.every=1"], {}, "set data.holdout (never select on the test split)"),
    (["train", RECIPE, "train.keep_best=true"], {}, "set eval.every > 0"),
    (["train", RECIPE, "data.holdout=100", "eval.every=1", "eval.final=best"], {}, "train.keep_best=true"),
    (["train", RECIPE, "data.holdout=100", "eval.every=1", "train.keep_best=true", "eval.final=best",
      "eval.split=val"], {}, "chosen on"),
    (["train", RECIPE, "data.holdout=100", "eval.every=1", "method.name=adv_rotation"], {}, "pretext task"),
    (["train", RECIPE, "train.lr=0.1"], {}, "did you mean optim.lr?"),
    # outputs that cannot be written: found before any model is loaded, not after the work
    (["train", RECIPE, "run.out_dir={tmp}/blocker/runs"], {}, "blocker is a file, not a folder"),
    (["eval", "--checkpoint", "{resnet}", "--dataset", "mnist", "--out", "{tmp}/blocker/r.json"], {},
     "--out={tmp}/blocker/r.json"),
    (["eval", "--checkpoint", "{resnet}", "--dataset", "mnist", "--out", "{tmp}/images"], {}, "images is a folder"),
    (["prepare", "digits", "--out", "{tmp}/blocker/ffcv"], {}, "blocker is a file, not a folder"),
]


@pytest.mark.parametrize("args,env,names", MISTAKES, ids=[m[2] for m in MISTAKES])
def test_a_mistake_exits_2_with_one_line_and_overwrites_nothing(world, args, env, names, monkeypatch, capsys):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = _tree(world["tmp"])
    assert main([a.format(**{k: str(v) for k, v in world.items()}) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dist-robust: error:"), err
    assert names.format(**{k: str(v) for k, v in world.items()}) in err, err
    assert _tree(world["tmp"]) == before


class _Payload:
    """Unpickling this creates a file: the proof that a loader executed code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("disguise", ["model.pt", "model.safetensors"])
def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path, disguise, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / disguise
    evil.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    if disguise.endswith(".safetensors"):  # with a forged sidecar whose hash matches the pickle
        digest = hashlib.sha256(evil.read_bytes()).hexdigest()
        (tmp_path / "model.json").write_text(json.dumps({"format": "dist_robust.checkpoint/1", "model_file":
                                                          disguise, "sha256": {"model": digest},
                                                          "config": {"model": {"name": "cnn3"}}}))
    for args in (["eval", "--checkpoint", str(evil), "--dataset", "mnist"],
                 ["train", RECIPE, f"model.init_from={evil}", f"run.out_dir={tmp_path}"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(evil) in err, err
    from dist_robust.checkpoint import CheckpointError, load_checkpoint
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    if disguise.endswith(".pt"):  # the foreign-format path (scripts/convert_*): torch.load(weights_only=True)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(evil, weights_only=True)
    assert not marker.exists()


def test_a_missing_source_names_the_recipe_that_trains_it(tmp_path, monkeypatch, capsys):
    """The fine-tuning recipes start from a source run that another recipe in configs/ trains."""
    (tmp_path / "configs" / "pair").mkdir(parents=True)
    (tmp_path / "configs" / "pair" / "source.yaml").write_text("run: {out_dir: runs/pair, name: source}\n")
    (tmp_path / "configs" / "pair" / "tune.yaml").write_text(
        "data: {name: digits}\nmodel: {init_from: runs/pair/source}\nrun: {out_dir: runs/pair, name: tune}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "configs/pair/tune.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("configs/pair/source.yaml trains it: run `dist-robust train configs/pair/source.yaml` first")


def test_outputs_on_a_read_only_mount_are_refused_before_any_work(tmp_path, capsys):
    """run.out_dir and eval --out on a read-only file system: exit 2 and one line, nothing evaluated."""
    from conftest import tmpfs
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        checkpoint = _checkpoint(tmp_path / "model", "cnn3")
        for args in (["train", RECIPE, f"run.out_dir={ro}/runs"],
                     ["eval", "--checkpoint", checkpoint, "--dataset", "mnist", "--out", f"{ro}/r.json"]):
            assert main(args) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"{ro} is on a read-only file system" in err, err


def _uncreatable() -> Path:
    """A folder where creating a file fails whatever the permission bits say, for root too (os.access
    says yes there): sysfs, else procfs."""
    import tempfile
    for folder in (Path("/sys/kernel"), Path("/proc")):
        try:
            fd, probe = tempfile.mkstemp(dir=folder)
        except OSError:
            return folder
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no folder here refuses new files (/sys/kernel and /proc take them)")


def test_outputs_where_nothing_can_be_created_are_refused_before_any_work(world, capsys):
    """train's run folder, eval --out and report --plot in a folder that is writable by its permission
    bits but where creating a file fails (/sys): exit 2 and one line each, before the ranks, the
    evaluation or the report (a traceback in train, a failure after the evaluation, before)."""
    bad = _uncreatable()
    for args, flag in ((["train", RECIPE, f"run.out_dir={bad}/dist_robust_test"], f"run.out_dir='{bad}/"),
                       (["eval", "--checkpoint", world["resnet"], "--dataset", "mnist", "--limit", "8", "--attacks",
                         "clean", "--out", f"{bad}/dist_robust_test/r.json"], f"--out={bad}/"),
                       (["report", str(world["run"]), "--plot", f"{bad}/dist_robust_test"], f"--plot={bad}/")):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"dist-robust: error: {flag}"), err
        assert f"cannot create files in {bad} (" in err, err
    assert not (bad / "dist_robust_test").exists()
