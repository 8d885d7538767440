"""Installed package versions, read from package metadata.

Importing ``transformers`` to read ``__version__`` takes seconds; the metadata says the same at
once. Used for the manifest's record and in cache keys that a library upgrade must invalidate.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def installed_version(package: str) -> str:
    """``package``'s installed version, or ``"not installed"``."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
