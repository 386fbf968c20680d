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
