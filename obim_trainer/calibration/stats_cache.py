"""Statistics stored beside each checkpoint and reused while they are valid.

A statistics file is named by a key: the hash of the tokenized calibration data (texts,
tokenizer, sample count, max length) and of the checkpoint's fingerprint. Other calibration
data or a changed checkpoint give another key, so stale statistics are never found, let alone
used. Files are only ever added to a checkpoint folder, never changed or removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from obim_trainer.calibration.activation_stats import FORMAT_VERSION, ActivationStats
from obim_trainer.errors import CalibrationError

logger = logging.getLogger(__name__)

STATS_DIRNAME = "obim_stats"
DEFAULT_CACHE = Path(os.environ.get("OBIM_STATS_CACHE", Path.home() / ".cache" / "obim_trainer" / "stats"))


def stats_key(calibration_fingerprint: str, checkpoint_fingerprint: str) -> str:
    """Key of the statistics of one checkpoint on one calibration set."""
    text = f"obim-stats-v{FORMAT_VERSION}\0{calibration_fingerprint}\0{checkpoint_fingerprint}"
    return hashlib.sha256(text.encode()).hexdigest()


def stats_path(checkpoint_dir: Path, key: str) -> Path:
    """Where the statistics of ``checkpoint_dir`` for ``key`` live beside the checkpoint."""
    return Path(checkpoint_dir) / STATS_DIRNAME / f"{key[:16]}.safetensors"


def _cache_path(cache_dir: Path, checkpoint_dir: Path, key: str) -> Path:
    return cache_dir / f"{Path(checkpoint_dir).resolve().name}-{key[:16]}.safetensors"


def _try_load(path: Path, key: str) -> ActivationStats | None:
    if not path.is_file():
        return None
    try:
        return ActivationStats.load(path, expected_key=key)
    except CalibrationError as exc:
        logger.warning("not using %s: %s", path, exc)
        return None


def load_or_compute_stats(
    checkpoint_dir: Path,
    key: str,
    compute: Callable[[], ActivationStats],
    *,
    cache_dir: Path | None = None,
    recompute: bool = False,
) -> tuple[ActivationStats, str]:
    """Cached statistics of a checkpoint, or freshly computed ones (then stored).

    Returns ``(stats, source)`` with ``source`` ``"cached"`` or ``"computed"``. Statistics go
    beside the checkpoint; if its folder is read-only, into ``cache_dir``
    (default ``~/.cache/obim_trainer/stats``).
    """
    checkpoint_dir = Path(checkpoint_dir)
    cache = cache_dir or DEFAULT_CACHE
    candidates = [stats_path(checkpoint_dir, key), _cache_path(cache, checkpoint_dir, key)]
    if not recompute:
        for path in candidates:
            stats = _try_load(path, key)
            if stats is not None:
                logger.info("reusing activation statistics %s", path)
                return stats, "cached"
    stats = compute()
    try:
        stats.save(candidates[0], key)
    except OSError as exc:
        logger.info("cannot write beside %s (%s); keeping its statistics in %s", checkpoint_dir, exc, cache)
        stats.save(candidates[1], key)
    return stats, "computed"
