"""When the callback merges (rank 0's decision, sent to every rank with the merge to make)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from obim_trainer.settings.callback import OBIMConfig
from obim_trainer.training.record import MergedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeSchedule:
    """Merge every ``every`` saves (0: never by count) and, with ``on_change``, whenever the selection
    changed; never with fewer than ``min_checkpoints`` selected or the very checkpoints merged last."""

    every: int
    on_change: bool
    min_checkpoints: int

    @classmethod
    def of(cls, config: OBIMConfig) -> MergeSchedule:
        return cls(config.merge_every_saves, config.merge_on_change, config.min_checkpoints)

    def due(self, saves: int, changed: bool) -> bool:
        """Whether the save just recorded (the ``saves``-th) calls for a merge."""
        return bool(self.every and saves % self.every == 0) or (changed and self.on_change)

    def ready(self, selected: list[int], merged: list[MergedModel]) -> bool:
        """Whether the selection can be merged: enough checkpoints, and not the ones the last merge has."""
        if len(selected) < self.min_checkpoints:
            logger.info("%d checkpoint(s) selected, fewer than min_checkpoints; no merge yet", len(selected))
            return False
        if merged and merged[-1].checkpoints == selected:
            logger.info("checkpoints %s are already merged in %s", selected, merged[-1].path)
            return False
        return True
