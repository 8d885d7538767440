"""Weights & Biases through the run the Trainer's ``WandbCallback`` opened.

The callback never opens a run: W&B is the user's choice (``report_to``), made once for the
Trainer. Only the main process logs; with W&B off, absent, or ``report_to="none"``,
:func:`make_run_logger` returns a :class:`~obim_trainer.tracking.logger.NullLogger`. Values go
on the ``train/global_step`` axis that ``WandbCallback`` defines, next to the Trainer's curves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from obim_trainer.distributed import is_main_process
from obim_trainer.tracking.logger import NullLogger, RunLogger
from obim_trainer.tracking.payload import Histogram, Image, Table, Value

logger = logging.getLogger(__name__)

STEP_KEY = "train/global_step"


class WandbLogger(RunLogger):
    """Logs into ``wandb.run``; skips (with a debug message) while no run is open."""

    def __init__(self, wandb: Any) -> None:
        self._wandb = wandb

    def _convert(self, value: Value) -> Any:
        if isinstance(value, Table):
            return self._wandb.Table(columns=value.columns, data=value.rows)
        if isinstance(value, Image):
            return self._wandb.Image(str(value.path))
        if isinstance(value, Histogram):
            return self._wandb.Histogram(np_histogram=(np.asarray(value.counts), np.asarray(value.edges)))
        return value

    def emit(self, step: int, values: Mapping[str, Value]) -> None:
        run = self._wandb.run
        if run is None:
            logger.debug("no W&B run is open; not logging %s", ", ".join(values))
            return
        if values:
            run.log({**{key: self._convert(v) for key, v in values.items()}, STEP_KEY: step})


def make_run_logger(report_to: Sequence[str] | str | None) -> RunLogger:
    """A :class:`WandbLogger` on the main process when the Trainer reports to W&B, else a :class:`NullLogger`."""
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "wandb" not in targets and "all" not in targets:
        return NullLogger()
    if not is_main_process():
        return NullLogger()
    try:
        import wandb
    except ImportError:
        logger.info("report_to asks for W&B but wandb is not installed; OBIM logs nothing")
        return NullLogger()
    return WandbLogger(wandb)
