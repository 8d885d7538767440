"""Per-user state kept between runs: the cache folder and the installed versions that key it.

Compiled kernels, model layouts and tokenized calibration sets live under :func:`cache_dir`. Each
entry is a pure function of inputs named in its file name (a content hash, including the versions
of the libraries that produced it), so an entry is never stale, only unused; deleting the folder is
always safe. Entries are written with :func:`~obim_trainer.checkpoints.atomic.write_atomically`, so
that processes starting together (the ranks of a run, merge workers) never read half a file.
"""

from __future__ import annotations

import functools
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CACHE_ENV = "OBIM_CACHE_DIR"


def cache_dir(kind: str) -> Path:
    """``$OBIM_CACHE_DIR/kind``, by default ``$XDG_CACHE_HOME/obim_trainer/kind`` (``~/.cache/...``)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / kind
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "obim_trainer" / kind


@functools.cache
def installed_version(package: str) -> str:
    """``package``'s installed version from its metadata (importing ``transformers`` to read
    ``__version__`` takes seconds), or ``"not installed"``. Used in the manifest and in cache keys."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
