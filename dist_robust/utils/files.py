"""Writes that never leave a half-written file, and content hashes."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or, if anything fails (a full disk, a kill), what it held before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode open() would
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # one line that names the file (ENOSPC says neither file nor folder)
            raise OSError(e.errno, f"{e.strerror} while writing {path} ({len(data):,} bytes); "
                                   "its previous version is untouched") from None
        raise


def unwritable(folder: Path) -> str | None:
    """Why files cannot be written into ``folder`` (created if missing), or None: a regular file in the
    way, a read-only file system, or a folder where creating a file fails. A file is created (and
    removed) in ``folder`` or, when it does not exist yet, in its nearest existing parent, where its
    missing folders would go: permission bits say yes to root everywhere, and to anyone on /sys, where
    nothing can be created. Nothing is left behind, and ranks checking at once do not collide."""
    existing = Path(folder).expanduser().absolute()
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return f"{existing} is a file, not a folder"
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            return f"{existing} is on a read-only file system"
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot create files in {existing} ({e.strerror})"
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 of a file read in 4 MiB chunks (a .beton can be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
