"""Ranking checkpoints by a metric: the one rule every "best checkpoints" choice uses.

The paper merges "the 3 best checkpoints by Japanese evaluation". Three places make that
choice: ``--run-dir`` (the top-k of a finished run, :mod:`~obim_trainer.training.run_dir`),
the callback during training (:class:`~obim_trainer.training.selectors.TopKSelector`) and
``new_rows='best'`` (the best of the given checkpoints). They all rank with
:func:`best_by_metric`, so the same metrics always give the same picks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal, TypeVar

MetricMode = Literal["auto", "min", "max"]
T = TypeVar("T")


def resolve_mode(metric: str, mode: MetricMode) -> Literal["min", "max"]:
    """``auto`` means lower is better for losses and perplexities, higher for everything else."""
    if mode != "auto":
        return mode
    lowered = metric.lower()
    return "min" if ("loss" in lowered or "perplexity" in lowered or lowered.endswith("ppl")) else "max"


def best_by_metric(
    items: Iterable[T],
    value: Callable[[T], float],
    step: Callable[[T], int],
    metric: str,
    mode: MetricMode = "auto",
    top_k: int | None = None,
) -> list[T]:
    """``items`` best first by ``value`` (the ``top_k`` best when given).

    Lower is better for ``mode='min'``, higher for ``'max'`` (``'auto'``: :func:`resolve_mode`).
    Ties go to the later ``step`` (the checkpoint trained longer on the new data); a NaN value
    ranks after every number, so a diverged evaluation is never picked over a real one.
    """
    sign = 1.0 if resolve_mode(metric, mode) == "min" else -1.0

    def key(item: T) -> tuple[bool, float, int]:
        number = value(item)
        return math.isnan(number), 0.0 if math.isnan(number) else sign * number, -step(item)

    ranked = sorted(items, key=key)
    return ranked if top_k is None else ranked[:top_k]
