"""Which of the checkpoints saved so far to merge, decided during training.

The paper merges "the 3 best checkpoints by Japanese evaluation" with the base. During a run
every save adds a :class:`Candidate` (its step, folder and per-language metrics) and a
:class:`Selector` picks the ones to merge, best first. :class:`TopKSelector` is that rule
(ranked by :func:`~obim_trainer.training.ranking.best_by_metric`, as ``--run-dir`` ranks a finished run);
other rules subclass :class:`Selector` and are passed to the callback or registered by name.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from obim_trainer.calibration import ActivationStats, stats_path
from obim_trainer.errors import ConfigError
from obim_trainer.training.ranking import MetricMode, best_by_metric

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A saved checkpoint that may be merged.

    Attributes:
        step: The global step it was saved at.
        path: The folder the Trainer saved (``<output_dir>/checkpoint-<step>``); rotation may delete it.
        metrics: Its evaluation, e.g. ``eval_ja_loss`` (Trainer) and ``obim_ja_loss`` (the evaluator).
        stats_key: Key of the activation statistics stored beside it (``None`` without statistics).
        protected: A copy kept while it is selected
            (see :class:`~obim_trainer.training.checkpoint_guard.CheckpointGuard`).
    """

    step: int
    path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    stats_key: str | None = None
    protected: Path | None = None

    @property
    def merge_path(self) -> Path:
        """Where to read it from: the protected copy when there is one."""
        return self.protected if self.protected is not None else self.path

    @property
    def available(self) -> bool:
        return self.merge_path.is_dir()

    def load_stats(self) -> ActivationStats | None:
        """The activation statistics recorded at its save (``None`` if none were)."""
        if self.stats_key is None:
            return None
        return ActivationStats.load(stats_path(self.merge_path, self.stats_key), self.stats_key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "path": str(self.path),
            "metrics": self.metrics,
            "stats_key": self.stats_key,
            "protected": None if self.protected is None else str(self.protected),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        protected = data.get("protected")
        return cls(
            step=int(data["step"]),
            path=Path(data["path"]),
            metrics={k: float(v) for k, v in data.get("metrics", {}).items()},
            stats_key=data.get("stats_key"),
            protected=None if protected is None else Path(protected),
        )


class Selector(ABC):
    """Picks the checkpoints to merge from the candidates whose files still exist."""

    name: ClassVar[str]

    @abstractmethod
    def select(self, candidates: Sequence[Candidate], top_k: int) -> list[Candidate]:
        """At most ``top_k`` candidates, in merge order (best first)."""


class TopKSelector(Selector):
    """The ``top_k`` best by one metric; lower is better for losses and perplexities unless told otherwise."""

    name = "top_k"

    def __init__(self, metric: str, mode: MetricMode = "auto") -> None:
        self.metric = metric
        self.mode = mode

    def select(self, candidates: Sequence[Candidate], top_k: int) -> list[Candidate]:
        scored = [c for c in candidates if self.metric in c.metrics]
        if len(scored) < len(candidates):
            missing = sorted(c.step for c in candidates if self.metric not in c.metrics)
            logger.info("checkpoints without %s are not candidates: steps %s", self.metric, missing)
        return best_by_metric(scored, lambda c: c.metrics[self.metric], lambda c: c.step, self.metric, self.mode, top_k)


class LatestSelector(Selector):
    """The ``top_k`` most recent checkpoints, newest first (a baseline that needs no evaluation)."""

    name = "latest"

    def __init__(self, metric: str | None = None, mode: MetricMode = "auto") -> None:
        del metric, mode  # same signature as every registered selector

    def select(self, candidates: Sequence[Candidate], top_k: int) -> list[Candidate]:
        return sorted(candidates, key=lambda c: -c.step)[:top_k]


SELECTORS: dict[str, type[Selector]] = {TopKSelector.name: TopKSelector, LatestSelector.name: LatestSelector}


def register_selector(cls: type[Selector]) -> type[Selector]:
    """Make a selector available by its ``name`` (usable as a decorator); it is built as ``cls(metric, mode)``."""
    SELECTORS[cls.name] = cls
    return cls


def build_selector(name: str, metric: str, mode: MetricMode = "auto") -> Selector:
    if name not in SELECTORS:
        raise ConfigError(f"unknown selector '{name}'; choose one of {', '.join(sorted(SELECTORS))}")
    return SELECTORS[name](metric, mode)  # type: ignore[call-arg]
