"""Files a service keeps under $MINEDRAFT_CACHE to start faster next time: written whole or not at all, and
never a reason to fail — a folder that cannot be written only means the next start computes them again."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def write_atomically(path: Path, write: Callable[[Path], None]) -> bool:
    """Calls `write` on a fresh temporary file beside `path`, flushes it to disk and renames it into place, so
    a reader (another service on a shared volume) sees the old file or the whole new one; False, with a
    warning, where the folder cannot be written."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        temporary = Path(name)
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        temporary.replace(path)
        return True
    except OSError as error:
        log.warning("could not keep %s (%s); it is computed again at the next start", path, error)
        return False
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)


def remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("could not remove %s (%s)", path, error)


def source_digest(*roots: Path) -> str:
    """A digest of the Python source under `roots`: what is kept is computed by this code, and a change to it
    (a new commit; the package version stays 0.1.0) makes a new key rather than trusting an old file."""
    digest = hashlib.sha256()
    for root in roots:
        for source in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def older_than(path: Path, seconds: float) -> bool:
    """Whether `path` was last written more than `seconds` ago (a file that cannot be read counts as old)."""
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return True


def prune_older_than(folder: Path, pattern: str, seconds: float) -> int:
    """Removes the files in `folder` matching `pattern` last written more than `seconds` ago, so a folder keyed
    by code and engine does not grow with every commit; how many were removed."""
    old = [path for path in folder.glob(pattern) if older_than(path, seconds)]
    for path in old:
        remove_quietly(path)
    return len(old)
