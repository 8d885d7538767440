"""Files this project keeps per user between runs: compiled kernels, model layouts, tokenized calibration sets.

Each is a pure function of inputs named in its file name (a content hash), so an entry is never
stale, only unused; deleting the folder is always safe. Entries are written atomically, so that
processes starting together (the ranks of a run, merge workers) never read half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

CACHE_ENV = "OBIM_CACHE_DIR"


def cache_dir(kind: str) -> Path:
    """``$OBIM_CACHE_DIR/kind``, by default ``$XDG_CACHE_HOME/obim_trainer/kind`` (``~/.cache/...``)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / kind
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "obim_trainer" / kind


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file in its folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)
