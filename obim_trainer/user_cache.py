"""Files this project keeps per user between runs: compiled kernels, model layouts, tokenized calibration sets.

Each is a pure function of inputs named in its file name (a content hash), so an entry is never
stale, only unused; deleting the folder is always safe. Entries are written with
:func:`~obim_trainer.checkpoints.atomic.write_atomically`, so that processes starting together (the
ranks of a run, merge workers) never read half a file.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "OBIM_CACHE_DIR"


def cache_dir(kind: str) -> Path:
    """``$OBIM_CACHE_DIR/kind``, by default ``$XDG_CACHE_HOME/obim_trainer/kind`` (``~/.cache/...``)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / kind
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "obim_trainer" / kind
