"""Fuzzed recipes: every key of valid recipes set to a value of the wrong type, NaN or infinite, huge, empty,
or (for keys that take one of a few words) a wrong-case word. Each must be refused the way a user mistake
is: a ConfigError of one line naming the key, from the checks that run before any rank starts (config
and preflight), with nothing written. Validation only: nothing trains."""
import random

import pytest
from omegaconf import OmegaConf

from dist_robust.config import ConfigError, load_config
from dist_robust.preflight import preflight

RECIPES = ["configs/quickstart.yaml", "configs/finetune/mnist_to_fashion/trades.yaml"]
SKIP = {"stage.kind", "method.name"}  # they choose the schema itself (tests/test_config.py covers them)


def _leaves(cfg) -> dict:
    """key -> default value of every leaf of a recipe's config."""
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v
    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return flat


def _refused(recipe: str, override: str, tmp_path) -> str | None:
    """The error line, or None when the mutation was accepted."""
    try:
        cfg = load_config(recipe, [override, f"run.out_dir={tmp_path}/runs"])
        cfg.model.init_from = None if cfg.model.init_from and "init_from" not in override else cfg.model.init_from
        preflight([cfg], 1)
    except ConfigError as e:
        return str(e)
    return None


def _is_choice(recipe: str, key: str, tmp_path) -> bool:
    """A string key that takes one of a few words: an arbitrary word is refused."""
    return _refused(recipe, f"{key}=zzz_not_a_choice", tmp_path) is not None


def _mutations(recipe, key, default, rng, tmp_path) -> list[str]:
    out = []
    if isinstance(default, bool):
        out += [f"{key}=maybe", f"{key}=[1]"]
    elif isinstance(default, int):
        out += [f"{key}=many", f"{key}={2 ** 70}", f"{key}=1.5"]
    elif isinstance(default, float):
        out += [f"{key}=fast", f"{key}=nan", f"{key}=inf", f"{key}=-inf"]
    elif isinstance(default, list):
        out += [f"{key}=notalist" if not default or not isinstance(default[0], str) else f"{key}=[[1]]"]
    elif isinstance(default, str):
        out += [f"{key}=[1, 2]"]
        if _is_choice(recipe, key, tmp_path):
            word = default.swapcase() if default.swapcase() != default else default + "X"
            out += [f"{key}={word}", f"{key}=''"]
    elif default is None:
        out += [f"{key}=[[1]]"]  # nested list: no key takes one
    rng.shuffle(out)
    return out


def _cases(tmp_path_factory):
    rng = random.Random(0)
    tmp = tmp_path_factory.mktemp("fuzz")
    cases = []
    for recipe in RECIPES:
        for key, default in _leaves(load_config(recipe, [f"run.out_dir={tmp}/runs"], training=False)).items():
            if key not in SKIP:
                cases += [(recipe, key, m) for m in _mutations(recipe, key, default, rng, tmp)]
    return cases


@pytest.mark.slow
def test_every_mutated_key_is_refused_in_one_line_naming_it(tmp_path_factory, tmp_path):
    cases = _cases(tmp_path_factory)
    accepted, bad_lines = [], []
    for recipe, key, override in cases:
        err = _refused(recipe, override, tmp_path)
        if err is None:
            accepted.append(f"{recipe}: {override}")
        elif "\n" in err or key not in err:
            bad_lines.append(f"{recipe}: {override} -> {err!r}")
    assert not list(tmp_path.rglob("*")), "a refused recipe wrote files"
    assert not accepted, f"{len(accepted)} of {len(cases)} accepted:\n" + "\n".join(accepted)
    assert not bad_lines, "\n".join(bad_lines)
    assert len(cases) > 200
    print(f"{len(cases)} fuzzed overrides, every one refused in one line naming its key")
