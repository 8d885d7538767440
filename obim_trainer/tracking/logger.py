"""What the callback reports, independent of where it goes.

:class:`RunLogger` turns checkpoint evaluations, candidates, merge summaries and timings into
named values on the training step axis; a backend only implements :meth:`RunLogger.emit`.
:class:`NullLogger` is the backend when tracking is off: ``enabled`` is False so the callback
also skips the work done only for logs (merge summaries).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

from obim_trainer.evaluation.comparison import ComparisonTable
from obim_trainer.tracking.merge_summary import LayerSummary
from obim_trainer.tracking.payload import Table, Value
from obim_trainer.training.selectors import Candidate

PREFIX = "obim"


def checkpoint_label(candidate: Candidate) -> str:
    return f"ckpt-{candidate.step}"


class RunLogger(ABC):
    """Names and shapes the callback's records; subclasses send them somewhere."""

    enabled = True

    @abstractmethod
    def emit(self, step: int, values: Mapping[str, Value]) -> None:
        """Record ``values`` at training step ``step``."""

    def log_checkpoint(self, step: int, metrics: Mapping[str, float]) -> None:
        """A checkpoint's per-language evaluation (``obim/checkpoint/<metric>``)."""
        self.emit(step, {f"{PREFIX}/checkpoint/{name}": value for name, value in metrics.items()})

    def log_merge(self, step: int, metrics: Mapping[str, float], merged: Sequence[Candidate]) -> None:
        """A merged model's per-language evaluation (``obim/merged/<metric>``) and what went in."""
        values: dict[str, Value] = {f"{PREFIX}/merged/{name}": value for name, value in metrics.items()}
        values[f"{PREFIX}/merged/num_checkpoints"] = len(merged)
        self.emit(step, values)

    def log_candidates(self, step: int, candidates: Sequence[Candidate], selected: Sequence[Candidate]) -> None:
        """Every candidate so far: step, selected rank (merge order, 1 = first) and metrics."""
        rank = {c.step: i + 1 for i, c in enumerate(selected)}
        names = sorted({name for c in candidates for name in c.metrics})
        rows = [
            [c.step, c.step in rank, rank.get(c.step), *(c.metrics.get(name) for name in names)]
            for c in sorted(candidates, key=lambda c: c.step)
        ]
        self.emit(step, {f"{PREFIX}/candidates": Table(["step", "selected", "merge_rank", *names], rows)})

    def log_merge_summary(
        self,
        step: int,
        layers: Mapping[str, LayerSummary],
        merged: Sequence[Candidate],
        ownership_share: Sequence[float] | None,
        bins: int = 64,
    ) -> None:
        """Saliency histograms, ownership share per checkpoint and retained fraction, per layer type."""
        labels = [checkpoint_label(c) for c in merged]
        values: dict[str, Value] = {}
        for name, layer in layers.items():
            for label, histogram in zip(labels, layer.histograms(bins), strict=False):
                if histogram is not None:
                    values[f"{PREFIX}/saliency/{name}/{label}"] = histogram
            for label, share in zip(labels, layer.ownership_share() or [], strict=False):
                values[f"{PREFIX}/ownership/{name}/{label}"] = share
            retained = layer.retained_fraction()
            if retained is not None:
                values[f"{PREFIX}/retained/{name}"] = retained
        for label, share in zip(labels, ownership_share or [], strict=False):
            values[f"{PREFIX}/ownership/all/{label}"] = share
        self.emit(step, values)

    def log_sweep(self, step: int, table: ComparisonTable) -> None:
        """The total-share sweep: every merge's per-language values, average and which was kept."""
        rows = [
            [r.name, *(table.value(r, x) for x in table.languages), table.average(r), r.name == table.picked]
            for r in table.rows
        ]
        columns = ["merge", *table.columns.values(), "avg", "picked"]
        self.emit(step, {f"{PREFIX}/sweep": Table(columns, rows)})

    def log_timings(self, step: int, timings: Mapping[str, float]) -> None:
        """Seconds spent in statistics, merging and evaluation (``obim/time/<what>_s``)."""
        self.emit(step, {f"{PREFIX}/time/{name}": seconds for name, seconds in timings.items()})


class NullLogger(RunLogger):
    """Tracking is off: nothing is recorded."""

    enabled = False

    def emit(self, step: int, values: Mapping[str, Value]) -> None:
        del step, values
