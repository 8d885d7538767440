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

Beside each statistics file, ``<file>.json`` says what it was computed from (:class:`StatsOrigin`:
the kind, the checkpoint's fingerprint, the calibration samples). When no statistics match a merge's
inputs but some exist for the same checkpoint (the training's, on other calibration settings), the
merge says in one line why it cannot reuse them before recomputing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from obim_trainer._user_cache import cache_dir
from obim_trainer.calibration.activation_stats import FORMAT_VERSION, ActivationStats
from obim_trainer.calibration.data import CalibrationSet
from obim_trainer.checkpoints.atomic import write_atomically
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


@dataclass(frozen=True)
class StatsOrigin:
    """What one statistics file was computed from, stored beside it as ``<file>.json``."""

    kind: str
    """The kind of statistics and its format (``activations``, ``grams-v2``, ...)."""
    checkpoint: str
    """The checkpoint's fingerprint (its files' names, sizes, times and edges)."""
    calibration: dict[str, Any] = field(default_factory=dict)
    """:func:`describe_calibration` of the texts it was measured on."""
    path: str = ""
    """The checkpoint folder, resolved (cache entries of other folders with the same name are not compared)."""

    @classmethod
    def of(
        cls, calibration: CalibrationSet, checkpoint_dir: Path, fingerprint: str, kind: str = ACTIVATIONS
    ) -> StatsOrigin:
        return cls(kind, fingerprint, describe_calibration(calibration), str(Path(checkpoint_dir).resolve()))

    @property
    def label(self) -> str:
        """How a message names the kind: "activation", "input Gram", "Fisher"."""
        return _LABELS.get(self.kind.split("-")[0], self.kind)


_LABELS = {"activations": "activation", "grams": "input Gram", "fisher": "Fisher"}


def describe_calibration(calibration: CalibrationSet) -> dict[str, Any]:
    """The calibration settings as the statistics see them: samples, tokens, the longest sample (the
    ``max_length`` when texts are longer) and the token ids' hash (texts and tokenizer)."""
    lengths = [int(ids.numel()) for ids in calibration.input_ids]
    return {
        "samples": len(lengths),
        "tokens": sum(lengths),
        "longest": max(lengths, default=0),
        "token_ids": calibration.fingerprint()[:16],
    }


def record_origin(stats_file: Path, origin: StatsOrigin) -> None:
    """Store ``origin`` beside ``stats_file`` (``<file>.json``), atomically; a failure only costs the explanation."""
    try:
        write_atomically(_origin_path(stats_file), json.dumps(asdict(origin), indent=1).encode())
    except OSError as exc:
        logger.debug("cannot record where %s comes from (%s)", stats_file, exc)


def _origin_path(stats_file: Path) -> Path:
    return Path(stats_file).with_suffix(".json")


def _stored_origins(checkpoint_dir: Path, cache: Path) -> list[tuple[Path, StatsOrigin]]:
    """The origins of every statistics file of ``checkpoint_dir``, beside it and in the cache, newest first."""
    candidates = [
        *(Path(checkpoint_dir) / STATS_DIRNAME).glob("*.json"),
        *cache.glob(f"{_cache_stem(checkpoint_dir)}-*.json"),
    ]
    found = []
    for path in candidates:
        try:
            data = json.loads(path.read_text())
            origin = StatsOrigin(str(data["kind"]), str(data["checkpoint"]), dict(data["calibration"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if path.with_suffix(".safetensors").is_file():
            found.append((path, origin))
    return sorted(found, key=lambda item: -item[0].stat().st_mtime)


def _settings(calibration: dict[str, Any]) -> str:
    return ", ".join(f"{name}={calibration[name]}" for name in ("samples", "longest", "tokens") if name in calibration)


def why_recomputed(checkpoint_dir: Path, origin: StatsOrigin, cache: Path) -> str | None:
    """Why the statistics stored for ``checkpoint_dir`` do not serve a merge asking for ``origin``, in one line
    (``None`` when none of that kind are stored)."""
    stored = [o for _path, o in _stored_origins(checkpoint_dir, cache) if o.kind == origin.kind]
    if not stored:
        return None
    name = Path(checkpoint_dir).name
    previous = stored[0]
    if previous.calibration == origin.calibration:
        if previous.checkpoint != origin.checkpoint:
            return f"the files of {name} changed since its {origin.label} statistics were computed; recomputing"
        return None
    before, now = previous.calibration, origin.calibration
    if _settings(before) == _settings(now):
        return (
            f"{origin.label} statistics for {name} were computed on other calibration token ids ({_settings(now)}: "
            "other texts or another tokenizer); recomputing"
        )
    return (
        f"{origin.label} statistics for {name} were computed with {_settings(before)}; this merge asks "
        f"{_settings(now)}; recomputing"
    )


def stats_path(checkpoint_dir: Path, key: str) -> Path:
    """Where the statistics of ``checkpoint_dir`` for ``key`` live beside the checkpoint."""
    return Path(checkpoint_dir) / STATS_DIRNAME / f"{key[:16]}.safetensors"


def _cache_stem(checkpoint_dir: Path) -> str:
    # the key already identifies the checkpoint; its folder name only helps a human browsing the cache
    return Path(checkpoint_dir).resolve().name


def _cache_path(cache_dir: Path, checkpoint_dir: Path, key: str) -> Path:
    return cache_dir / f"{_cache_stem(checkpoint_dir)}-{key[:16]}.safetensors"


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
    origin: StatsOrigin | None = None,
) -> tuple[S, str]:
    """Cached statistics of a checkpoint, or freshly computed ones (then stored).

    Looks beside the checkpoint, then in the cache folder; returns ``(stats, source)`` with
    ``source`` ``"cached"`` or ``"computed"``. New statistics go where :func:`stats_location` says:
    into ``cache_dir`` (default :func:`default_cache_dir`), or with ``beside`` beside the
    checkpoint, falling back to the cache when its folder cannot be written. ``recompute``
    ignores stored statistics and replaces them. ``load(path, key)`` reads one kind of
    statistics (default: activation statistics); the kind is part of the key, so kinds never mix.
    ``origin``: what the statistics are computed from; stored beside new ones, and compared with the
    stored ones' to say why those cannot be reused.
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
        reason = why_recomputed(checkpoint_dir, origin, cache) if origin is not None else None
        if reason:
            logger.info(reason)
    stats = compute()
    target = stats_location(checkpoint_dir, key, cache, beside=beside)
    try:
        stats.save(target, key)
        if origin is not None:
            record_origin(target, origin)
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
        if origin is not None:
            record_origin(cached, origin)
    except OSError as cache_exc:
        raise CalibrationError(
            f"cannot store statistics beside {checkpoint_dir} nor in {cache} ({cache_exc}); "
            f"set {setting_name('stats_cache_dir', 'DIR')} to a writable folder"
        ) from None
    return stats, "computed"
