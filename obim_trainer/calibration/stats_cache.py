"""Statistics cached per checkpoint and calibration set, and reused while they are valid.

A statistics file is named by a key: the hash of the tokenized calibration data (texts,
tokenizer, sample count, max length), of the checkpoint's fingerprint and of the kind of
statistics (activations, input Grams, Fisher diagonals; one cache for all of them). Other calibration
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
from typing import Protocol, TypeVar

from obim_trainer._user_cache import cache_dir
from obim_trainer.calibration.activation_stats import FORMAT_VERSION, ActivationStats
from obim_trainer.errors import CalibrationError
from obim_trainer.settings.names import setting_name

logger = logging.getLogger(__name__)

STATS_DIRNAME = "obim_stats"
ACTIVATIONS = "activations"


class StoredStats(Protocol):
    """What the cache needs of any kind of statistics: saving under a key (loading is passed in)."""

    def save(self, path: Path, key: str) -> None: ...


S = TypeVar("S", bound=StoredStats)


def default_cache_dir() -> Path:
    """The statistics cache: ``$OBIM_STATS_CACHE``, else the user cache's ``stats`` folder."""
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


def stats_location(checkpoint_dir: Path, key: str, cache: Path, *, beside: bool) -> Path:
    """Where new statistics of ``checkpoint_dir`` for ``key`` are written: beside it only if ``beside``."""
    return stats_path(checkpoint_dir, key) if beside else _cache_path(cache, checkpoint_dir, key)


def load_or_compute_stats(
    checkpoint_dir: Path,
    key: str,
    compute: Callable[[], S],
    *,
    cache_dir: Path | None = None,
    recompute: bool = False,
    load: Callable[[Path, str], S] = ActivationStats.load,  # type: ignore[assignment]
    beside: bool = False,
) -> tuple[S, str]:
    """Cached statistics of a checkpoint, or freshly computed ones (then stored).

    Looks beside the checkpoint, then in the cache folder; returns ``(stats, source)`` with
    ``source`` ``"cached"`` or ``"computed"``. New statistics go where :func:`stats_location` says:
    into ``cache_dir`` (default :func:`default_cache_dir`), or with ``beside`` beside the
    checkpoint, falling back to the cache when its folder cannot be written. ``recompute``
    ignores stored statistics and replaces them. ``load(path, key)`` reads one kind of
    statistics (default: activation statistics); the kind is part of the key, so kinds never mix.
    """
    checkpoint_dir = Path(checkpoint_dir)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = _cache_path(cache, checkpoint_dir, key)
    if not recompute:
        for path in (stats_path(checkpoint_dir, key), cached):
            stats = _try_load(path, key, load)
            if stats is not None:
                logger.info("reusing statistics %s", path)
                return stats, "cached"
    stats = compute()
    target = stats_location(checkpoint_dir, key, cache, beside=beside)
    try:
        stats.save(target, key)
        return stats, "computed"
    except OSError as exc:
        if target == cached:
            raise CalibrationError(
                f"cannot store statistics in {cache} ({exc}); "
                f"set {setting_name('stats_cache_dir', 'DIR')} to a writable folder or set OBIM_STATS_CACHE"
            ) from None
        logger.warning("cannot write beside %s (%s); storing its statistics in %s", checkpoint_dir, exc, cached)
    try:
        stats.save(cached, key)
    except OSError as cache_exc:
        raise CalibrationError(
            f"cannot store statistics beside {checkpoint_dir} nor in {cache} ({cache_exc}); "
            f"set {setting_name('stats_cache_dir', 'DIR')} to a writable folder"
        ) from None
    return stats, "computed"
