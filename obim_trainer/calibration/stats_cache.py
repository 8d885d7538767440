"""Statistics stored beside each checkpoint and reused while they are valid.

A statistics file is named by a key: the hash of the tokenized calibration data (texts,
tokenizer, sample count, max length), of the checkpoint's fingerprint and of the kind of
statistics (activations, input Grams, Fisher diagonals; one cache for all of them). Other calibration
data or a changed checkpoint give another key, so stale statistics are never found, and a file
whose stored key differs is never used. Only ``obim_stats/`` is ever written in a checkpoint
folder; the checkpoint's own files are never changed or removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from obim_trainer.calibration.activation_stats import FORMAT_VERSION, ActivationStats
from obim_trainer.errors import CalibrationError
from obim_trainer.user_cache import cache_dir

logger = logging.getLogger(__name__)

STATS_DIRNAME = "obim_stats"
ACTIVATIONS = "activations"


class StoredStats(Protocol):
    """What the cache needs of any kind of statistics: saving under a key (loading is passed in)."""

    def save(self, path: Path, key: str) -> None: ...


S = TypeVar("S", bound=StoredStats)


def default_cache_dir() -> Path:
    """Where statistics go when a checkpoint folder is read-only: ``$OBIM_STATS_CACHE``, else the user cache's."""
    override = os.environ.get("OBIM_STATS_CACHE")
    return Path(override) if override else cache_dir("stats")


def stats_key(calibration_fingerprint: str, checkpoint_fingerprint: str, kind: str = ACTIVATIONS) -> str:
    """Key of the statistics of one kind of one checkpoint on one calibration set (changes with the file format).

    ``kind`` names the statistics and their format (``grams-v1``); activation statistics keep the key they had.
    """
    text = f"obim-stats-v{FORMAT_VERSION}\0{calibration_fingerprint}\0{checkpoint_fingerprint}"
    if kind != ACTIVATIONS:
        text += f"\0{kind}"
    return hashlib.sha256(text.encode()).hexdigest()


def stats_path(checkpoint_dir: Path, key: str) -> Path:
    """Where the statistics of ``checkpoint_dir`` for ``key`` live beside the checkpoint."""
    return Path(checkpoint_dir) / STATS_DIRNAME / f"{key[:16]}.safetensors"


def _cache_path(cache_dir: Path, checkpoint_dir: Path, key: str) -> Path:
    # the key already identifies the checkpoint; its folder name only helps a human browsing the cache
    return cache_dir / f"{Path(checkpoint_dir).resolve().name}-{key[:16]}.safetensors"


def _try_load(path: Path, key: str, load: Callable[[Path, str], S]) -> S | None:
    if not path.is_file():
        return None
    try:
        return load(path, key)
    except CalibrationError as exc:
        logger.warning("not using %s: %s", path, exc)
        return None


def load_or_compute_stats(
    checkpoint_dir: Path,
    key: str,
    compute: Callable[[], S],
    *,
    cache_dir: Path | None = None,
    recompute: bool = False,
    load: Callable[[Path, str], S] = ActivationStats.load,  # type: ignore[assignment]
) -> tuple[S, str]:
    """Cached statistics of a checkpoint, or freshly computed ones (then stored).

    Looks beside the checkpoint, then in the cache folder; returns ``(stats, source)`` with
    ``source`` ``"cached"`` or ``"computed"``. New statistics go beside the checkpoint, or into
    ``cache_dir`` (default :func:`default_cache_dir`) when its folder cannot be written.
    ``recompute`` ignores stored statistics and replaces them. ``load(path, key)`` reads one kind of
    statistics (default: activation statistics); the kind is part of the key, so kinds never mix.
    """
    checkpoint_dir = Path(checkpoint_dir)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    beside, cached = stats_path(checkpoint_dir, key), _cache_path(cache, checkpoint_dir, key)
    if not recompute:
        for path in (beside, cached):
            stats = _try_load(path, key, load)
            if stats is not None:
                logger.info("reusing statistics %s", path)
                return stats, "cached"
    stats = compute()
    try:
        stats.save(beside, key)
    except OSError as exc:
        logger.warning("cannot write beside %s (%s); storing its statistics in %s", checkpoint_dir, exc, cached)
        try:
            stats.save(cached, key)
        except OSError as cache_exc:
            raise CalibrationError(
                f"cannot store statistics beside {checkpoint_dir} ({exc}) nor in {cache} ({cache_exc}); "
                "pass a writable folder with --stats-cache-dir (stats_cache_dir)"
            ) from None
    return stats, "computed"
