"""Config: defaults <- recipe <- overrides; every bad value exits with status 2 and one line naming it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_robust.cli import main
from dist_robust.config import ConfigError, _merge, load_config

RECIPE = "configs/quickstart.yaml"


def test_recipe_and_overrides_resolve():
    cfg = load_config(RECIPE, ["optim.lr=0.05", "attack.eps=0.2", "optim.milestones=[1, 2.5]", "train.epochs=3"])
    assert cfg.optim.lr == 0.05 and cfg.attack.eps == 0.2 and cfg.train.epochs == 3
    assert cfg.optim.milestones == [1, 2.5]


BAD = [
    (["optim.lrr=0.1"], "optim.lrr"),                 # unknown key
    (["nosuch.key=1"], "nosuch.key"),                 # unknown section
    (["train.epochs=many"], "train.epochs"),          # wrong type
    (["data.flip=maybe"], "data.flip"),               # wrong type
    (["attack.eps=-0.1"], "attack.eps"),              # negative eps
    (["attack.steps=0"], "attack.steps"),             # zero steps
    (["optim.lr=0"], "optim.lr"),                     # lr <= 0
    (["optim.lr=-1"], "optim.lr"),
    (["data.name=imagenet22k"], "data.name"),         # unknown dataset
    (["model.name=vit_huge"], "model.name"),          # unknown model
    (["eval.attacks=[clean,pgd-0]"], "eval.attacks"),  # impossible attack
    (["model.init_from=/no/such/ckpt"], "model.init_from"),
    (["eval.aa_block_size=0"], "eval.aa_block_size"),
    (["noequals"], "noequals"),
    (["data.name=cifar10"], "data.root"),           # user data without a folder
    (["data.name=cifar10", "data.root=/no/such/dir"], "data.root"),
]


@pytest.mark.parametrize("overrides,key", BAD)
def test_bad_values_exit_2_with_one_line(overrides, key, capsys):
    assert main(["train", RECIPE, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert key in err
    value = overrides[-1].split("=", 1)[1] if "=" in overrides[-1] else None
    if value:
        assert value.strip("[]").split(",")[-1] in err


def test_batch_smaller_than_world_size_is_refused(monkeypatch, capsys):
    # The environment torchrun would set for rank 0 of 4; validation happens before any process group.
    for k, v in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(k, v)
    assert main(["train", RECIPE, "data.batch_size=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.batch_size=2" in err and "world size (4)" in err and len(err.splitlines()) == 1


def test_missing_and_malformed_recipes(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(str(typo))


@pytest.mark.parametrize("program", [[sys.executable, "-m", "dist_robust"],
                                     [str(Path(sys.executable).with_name("dist-robust"))]])
@pytest.mark.multiproc
def test_console_entries_exit_2(program):
    r = subprocess.run(program + ["train", RECIPE, "attack.eps=-1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "attack.eps=-1" in r.stderr


def test_on_off_yes_no_stay_strings_in_overrides_and_recipes(tmp_path):
    """YAML 1.1 would read them as booleans: attack.compile=off must reach the config as 'off'."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("attack: {compile: off}\neval: {at_end: false}\n")
    cfg = load_config(str(recipe))
    assert cfg.attack.compile == "off" and cfg.eval.at_end is False
    assert load_config(None, ["attack.compile=on", "data.flip=true"]).attack.compile == "on"


def test_evaluation_precision_is_eval_precision_never_the_training_attacks(tmp_path, capsys):
    """attack.precision is the training attack's; the final evaluation, RiFT's and `dist-robust eval` read
    eval.precision (fp32 by default). On the CPU an fp16 PGD is refused, so an evaluation that inherited
    the checkpoint's attack.precision=fp16 would fail here; bf16 runs on the CPU."""
    from dist_robust.checkpoint import save_checkpoint
    from dist_robust.evaluate import eval_attack_opts
    from dist_robust.models import build_model
    cfg = load_config(None, ["attack.precision=fp16", "data.name=digits", "run.device=cpu"])
    assert eval_attack_opts(cfg)["precision"] == "fp32"
    assert eval_attack_opts(load_config(None, ["attack.precision=bf16", "eval.precision=bf16"]))["precision"] == "bf16"
    save_checkpoint(tmp_path, "model", build_model("cnn3", 1, 10, [0.5], [0.5]).state_dict(),
                    dict(config=cfg.to_dict(), epoch=1, step=1))
    args = ["eval", "--checkpoint", str(tmp_path), "--dataset", "digits", "--attacks", "clean,pgd-1", "--limit", "8"]
    results = tmp_path / "eval-digits-test.json"
    assert main(args) == 0
    assert json.loads(results.read_text())["attacks"]["pgd-1"]["precision"] == "fp32"
    assert main(args + ["--precision", "fp16"]) == 1  # the setting does reach the attack
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
    assert main(args + ["--precision", "bf16"]) == 0
    assert json.loads(results.read_text())["attacks"]["pgd-1"]["precision"] == "bf16"


def test_radii_are_read_as_fractions_wherever_a_float_is_expected(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("attack: {eps: 8/255, step_size: 2/255}\n")
    cfg = load_config(str(recipe), ["eval.eps=4/255"])
    assert (cfg.attack.eps, cfg.attack.step_size, cfg.eval.eps) == (8 / 255, 2 / 255, 4 / 255)
    with pytest.raises(ConfigError, match="attack.steps"):  # an integer key takes no fraction
        load_config(str(recipe), ["attack.steps=3/4"])
    with pytest.raises(ConfigError, match="run.name"):  # a string key keeps its text
        load_config(str(recipe), ["run.name=8/255"])


@pytest.mark.parametrize("key,suggestion", [("train.lr", "optim.lr"), ("optim.lrr", "optim.lr"),
                                            ("attack.epss", "attack.eps"), ("eval.atacks", "eval.attacks"),
                                            # other libraries' names: spelling alone suggested optim.decay_frac
                                            ("optim.learning_rate", "optim.lr"), ("train.learning_rate", "optim.lr"),
                                            ("optim.wd", "optim.weight_decay"), ("data.num_workers", "data.workers"),
                                            ("train.num_epochs", "train.epochs"), ("train.bs", "data.batch_size"),
                                            ("model.arch", "model.name"), ("attack.epsilon", "attack.eps")])
def test_an_unknown_key_names_the_nearest_valid_one(key, suggestion):
    with pytest.raises(ConfigError, match=rf"unknown key \(did you mean {suggestion}\?\)"):
        load_config(None, [f"{key}=1"])


@pytest.mark.parametrize("override,line", [
    # OmegaConf's own cause, kept as docs/troubleshooting.md shows it (the same on omegaconf 2.3 and 2.4)
    ("train.epochs=many", "train.epochs='many': Value 'many' of type 'str' could not be converted to Integer"),
    # ours: OmegaConf 2.3 says "str is not a ListConfig, list or tuple.", 2.4 "..., TupleConfig, list, or tuple."
    ("eval.attacks=pgd-10", "eval.attacks='pgd-10': must be a list, written [a, b] (one item: [a])"),
    ("optim.milestones=5", "optim.milestones=5: must be a list, written [a, b] (one item: [a])"),
    ("method.name=[1]", "method.name=[1]: unknown method (known: "),  # a list chooses no plug-in (was a TypeError)
    ("stage.kind={a: 1}", "stage.kind={'a': 1}: unknown stage kind (known: train, rift_mrc, rift_interpolate)"),
])
def test_wrong_types_read_the_same_on_every_omegaconf(override, line):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, [override])
    assert str(e.value).startswith(line), str(e.value)
    (section, key), value = override.split("=", 1)[0].split("."), yaml.safe_load(override.split("=", 1)[1])
    if section not in ("method", "stage"):  # the recipe's path (OmegaConf.merge, not update) says the same
        with pytest.raises(ConfigError) as e:
            _merge([{section: {key: value}}], [])
        assert str(e.value).startswith(line), str(e.value)


def private_omegaconf_uses(path: Path) -> list[str]:
    """'line: what' for each import of an omegaconf module other than omegaconf and omegaconf.errors (nodes,
    base, _utils, ...), of a private name, and each private member of OmegaConf's config objects touched
    (_get_node, _metadata, ...; any receiver but self and cls)."""
    import ast

    from omegaconf import DictConfig, ListConfig, Node, OmegaConf
    private = {n for c in (DictConfig, ListConfig, Node, OmegaConf) for n in dir(c)
               if n.startswith("_") and not n.startswith("__")}
    private |= {"_metadata", "_content", "_parent", "_flags_cache", "_get_node"}  # instance attributes too
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "omegaconf":
            if node.module not in ("omegaconf", "omegaconf.errors") or any(a.name.startswith("_") for a in node.names):
                found.append(f"{node.lineno}: from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if a.name.startswith("omegaconf.") and a.name != "omegaconf.errors"]
        elif (isinstance(node, ast.Attribute) and node.attr in private
              and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"{node.lineno}: .{node.attr}")
    return found


def test_only_omegaconfs_public_api_is_used():
    """The package, its scripts, bench and tests use OmegaConf's public API only: a private one may change in
    any release (issue 27). A key's declared type comes from the dataclasses (config._declared)."""
    root = Path(__file__).resolve().parents[1]
    found = [f"{path.relative_to(root)}:{use}" for folder in ("dist_robust", "scripts", "bench", "tests")
             for path in sorted((root / folder).rglob("*.py")) for use in private_omegaconf_uses(path)]
    assert not found, f"private OmegaConf API: {found}"
