"""`make install` decides by content: the same requirement files and package metadata with new file times
(a clone, a checkout, a copy) install nothing; a changed file installs again."""
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ("requirements.txt", "requirements-build.txt", "requirements-nodeps.txt", "setup.cfg", "pyproject.toml")


def _planned(tree: Path) -> str:
    """The commands `make install` would run in ``tree`` (a dry run)."""
    done = subprocess.run(["make", "-n", "--no-print-directory", "install"], cwd=tree, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_install_stamp_follows_content_not_file_times(tmp_path):
    for name in ("Makefile", *INPUTS):
        shutil.copy(ROOT / name, tmp_path / name)  # new file times, as in a fresh clone
    assert "pip install" in _planned(tmp_path)  # nothing installed yet
    # what the install recipe leaves behind: a stamp named by the inputs' content (the Makefile's STAMP)
    digest = hashlib.sha256(b"".join((tmp_path / n).read_bytes() for n in INPUTS)).hexdigest()[:16]
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / f".installed-{digest}").touch()
    later = time.time() + 60
    for name in INPUTS:  # newer than the stamp, same content: a checkout or a copy
        os.utime(tmp_path / name, (later, later))
    assert "pip install" not in _planned(tmp_path)
    with open(tmp_path / "requirements.txt", "a") as f:  # a changed pin installs again
        f.write("# changed\n")
    assert "pip install" in _planned(tmp_path)
