"""Statistics cached per checkpoint and calibration set, and reused while they are valid.

A statistics file is named by a key: the hash of the tokenized calibration data (texts,
tokenizer, sample count, max length) and of the checkpoint's fingerprint. Other calibration
data or a changed checkpoint give another key, so stale statistics are never found, and a file
whose stored key differs is never used.

Where new statistics go is decided here only (:func:`stats_location`): into the per-user cache
folder, so that a merge never writes into the folders it was given to read (a model hub cache,
another user's run, a read-only mount). Only when asked (``stats_beside_checkpoints``, or the
callback, for the checkpoints of its own run) do they go beside the checkpoint in ``obim_stats/``,
where every reader of the same files finds them; the checkpoint's own files are never changed.
Statistics already beside a checkpoint are read either way.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from obim_trainer.calibration.activation_stats import FORMAT_VERSION, ActivationStats
from obim_trainer.errors import CalibrationError
from obim_trainer.user_cache import cache_dir

logger = logging.getLogger(__name__)

STATS_DIRNAME = "obim_stats"


def default_cache_dir() -> Path:
    """The statistics cache: ``$OBIM_STATS_CACHE``, else the user cache's ``stats`` folder."""
    override = os.environ.get("OBIM_STATS_CACHE")
    return Path(override) if override else cache_dir("stats")


def stats_key(calibration_fingerprint: str, checkpoint_fingerprint: str) -> str:
    """Key of the statistics of one checkpoint on one calibration set (also changes with the file format)."""
    text = f"obim-stats-v{FORMAT_VERSION}\0{calibration_fingerprint}\0{checkpoint_fingerprint}"
    return hashlib.sha256(text.encode()).hexdigest()


def stats_path(checkpoint_dir: Path, key: str) -> Path:
    """Where the statistics of ``checkpoint_dir`` for ``key`` live beside the checkpoint."""
    return Path(checkpoint_dir) / STATS_DIRNAME / f"{key[:16]}.safetensors"


def _cache_path(cache_dir: Path, checkpoint_dir: Path, key: str) -> Path:
    # the key already identifies the checkpoint; its folder name only helps a human browsing the cache
    return cache_dir / f"{Path(checkpoint_dir).resolve().name}-{key[:16]}.safetensors"


def _try_load(path: Path, key: str) -> ActivationStats | None:
    if not path.is_file():
        return None
    try:
        return ActivationStats.load(path, expected_key=key)
    except CalibrationError as exc:
        logger.warning("not using %s: %s", path, exc)
        return None


def stats_location(checkpoint_dir: Path, key: str, cache: Path, *, beside: bool) -> Path:
    """Where new statistics of ``checkpoint_dir`` for ``key`` are written: beside it only if ``beside``."""
    return stats_path(checkpoint_dir, key) if beside else _cache_path(cache, checkpoint_dir, key)


def load_or_compute_stats(
    checkpoint_dir: Path,
    key: str,
    compute: Callable[[], ActivationStats],
    *,
    cache_dir: Path | None = None,
    recompute: bool = False,
    beside: bool = False,
) -> tuple[ActivationStats, str]:
    """Cached statistics of a checkpoint, or freshly computed ones (then stored).

    Looks beside the checkpoint, then in the cache folder; returns ``(stats, source)`` with
    ``source`` ``"cached"`` or ``"computed"``. New statistics go where :func:`stats_location` says:
    into ``cache_dir`` (default :func:`default_cache_dir`), or with ``beside`` beside the
    checkpoint, falling back to the cache when its folder cannot be written. ``recompute``
    ignores stored statistics and replaces them.
    """
    checkpoint_dir = Path(checkpoint_dir)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = _cache_path(cache, checkpoint_dir, key)
    if not recompute:
        for path in (stats_path(checkpoint_dir, key), cached):
            stats = _try_load(path, key)
            if stats is not None:
                logger.info("reusing activation statistics %s", path)
                return stats, "cached"
    stats = compute()
    target = stats_location(checkpoint_dir, key, cache, beside=beside)
    try:
        stats.save(target, key)
        return stats, "computed"
    except OSError as exc:
        if target == cached:
            raise CalibrationError(
                f"cannot store activation statistics in {cache} ({exc}); "
                "pass a writable folder with --stats-cache-dir (stats_cache_dir) or set OBIM_STATS_CACHE"
            ) from None
        logger.warning("cannot write beside %s (%s); storing its statistics in %s", checkpoint_dir, exc, cached)
    try:
        stats.save(cached, key)
    except OSError as cache_exc:
        raise CalibrationError(
            f"cannot store activation statistics beside {checkpoint_dir} nor in {cache} ({cache_exc}); "
            "pass a writable folder with --stats-cache-dir (stats_cache_dir)"
        ) from None
    return stats, "computed"
