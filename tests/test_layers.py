"""The package's floors: a module imports only from floors below its own (or from its own top-level
module or package). Every import counts, also those inside functions, so a lazy import cannot hide
an upward one."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dist_robust"

# Lowest first. A top-level module or package not listed here fails the test: place it.
FLOORS = [
    {"utils", "orphan", "torchrun"},               # files, seeding...; the launcher watch; torchrun's exit: nothing of ours
    {"dist", "schedules"},                         # process group, learning rates
    {"models", "data", "attacks", "checkpoint", "report"},
    {"evaluate", "tensorboard", "plots"},          # exact sharded evaluation; the run's journal; pictures
    {"methods"},
    {"config"},
    {"preflight", "lock"},                         # what a config needs of this machine; one writer per run
    {"engine"},                                    # the training loop
    {"api"},                                       # evaluate_model, load_dataset, load_model
    {"cli"},
    {"__main__"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The dist_robust modules ``path`` imports, resolved to absolute names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None:  # from . import dist -> dist_robust.dist
                found |= {f"{target}.{alias.name}" for alias in node.names}
            else:
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {t for t in found if t == "dist_robust" or t.startswith("dist_robust.")}


def floor_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, floor in enumerate(FLOORS):
        if top in floor:
            return i
    raise AssertionError(f"{module} is on no floor: add {top!r} to FLOORS in tests/test_layers.py")


def upward_imports() -> set[tuple[str, str]]:
    edges = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        if source == "dist_robust":
            continue
        for target in imports_of(path):
            if target == "dist_robust" or target.split(".")[1] == source.split(".")[1]:
                continue  # the package root, or inside one top-level module or package
            if floor_of(target) >= floor_of(source):
                edges.add((source, target))
    return edges


def test_no_module_imports_from_a_floor_above_or_beside_its_own():
    found = upward_imports()
    assert not found, "imports from the same or a higher floor: " + ", ".join(f"{a} -> {b}" for a, b in sorted(found))


def test_the_bottom_floor_imports_nothing_of_the_project():
    for path in (PACKAGE / "utils").glob("*.py"):
        outside = {t for t in imports_of(path) if not t.startswith("dist_robust.utils")}
        assert not outside, f"{path.name} imports {sorted(outside)}"


def test_methods_never_import_the_data_layer():
    """Floors allow it (methods sit above data), but a method never reaches into the data layer: the
    engine loads the splits a stage kind declares (``StageKind.splits``) and hands them to its ``run``;
    config checks read the data through the ``data`` section (``DataConfig.known_size``)."""
    found = {(_module_name(path), target) for path in sorted((PACKAGE / "methods").rglob("*.py"))
             for target in imports_of(path) if target == "dist_robust.data" or target.startswith("dist_robust.data.")}
    assert not found, "methods import the data layer: " + ", ".join(f"{a} -> {b}" for a, b in sorted(found))


def test_the_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The parser itself: an import inside a function, relative at two levels, is found and resolved."""
    fake = tmp_path / "dist_robust" / "data"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("def f():\n    from ..engine.train import train\n    from . import memory\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "dist_robust")
    assert imports_of(fake / "x.py") == {"dist_robust.engine.train", "dist_robust.data.memory"}


# Private internals of dependencies that the package once used and replaced by their public APIs (issues 26
# and 27): DeepSpeed's ZeRO partitions (now safe_get/set_full_optimizer_state), torch's functional
# collectives (now torch.distributed.all_reduce in an autograd function), a hand-parsed safetensors header
# (now safe_open). None may come back; no file is exempt.
PRIVATE_NAMES = ("single_partition_of_fp32_groups", "_lazy_init_hp_params_optimizer_state", "_hp_mapping",
                 "_functional_collectives", "_c10d_functional")


def private_uses(package: Path = PACKAGE) -> list[str]:
    """'file: what' for each private name above in the package's source, and each import of a dependency's
    private module (a dotted component starting with '_', like ``torch.distributed._functional_collectives``)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        text, where = path.read_text(), path.relative_to(package.parent)
        found += [f"{where}: {name}" for name in PRIVATE_NAMES if name in text]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            found += [f"{where}: import {m}" for m in modules if m.split(".")[0] != "dist_robust"
                      and m != "__future__" and any(part.startswith("_") for part in m.split(".")[1:])]
    return found


# Private imports found when the check was written, each named: numpy's pickled arrays name numpy._core's
# functions, which the restricted unpickler must therefore allow; CARTL recognises torch's spectral-norm
# parametrisation by its class. Anything else fails.
KNOWN_PRIVATE = {
    "dist_robust/data/sources.py: import numpy._core",
    "dist_robust/data/sources.py: import numpy._core.multiarray",
    "dist_robust/data/sources.py: import numpy._core.numeric",
    "dist_robust/methods/cartl.py: import torch.nn.utils.parametrizations._SpectralNorm",
}


def test_no_private_api_of_a_dependency():
    found = [f for f in private_uses() if f not in KNOWN_PRIVATE]
    assert not found, "private internals of dependencies: " + ", ".join(found)


def test_the_private_api_check_sees_what_it_must(tmp_path):
    fake = tmp_path / "dist_robust"
    fake.mkdir()
    (fake / "a.py").write_text("def f():\n    from torch.distributed._functional_collectives import all_reduce\n"
                               "    from torch.distributed import _functional_collectives\n")
    (fake / "b.py").write_text("def g(zero):\n    return zero.single_partition_of_fp32_groups\n")
    (fake / "c.py").write_text("from __future__ import annotations\nfrom .x import _y\nimport torch.nn.functional\n")
    found = private_uses(fake)
    assert "dist_robust/a.py: import torch.distributed._functional_collectives.all_reduce" in found
    assert "dist_robust/b.py: single_partition_of_fp32_groups" in found
    assert not [f for f in found if f.startswith("dist_robust/c.py")]
