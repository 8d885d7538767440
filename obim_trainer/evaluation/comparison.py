"""One table for the base, the checkpoints and the merges, evaluated alike, and a pick by objective.

The paper judges a merge by every language at once (Table 2: each task and the average). Users
compare before they trust, so the same table serves the demo, ``obim-merge-ckpts --evaluate`` and
the callback's total-share sweep: one row per model, one column per language (the evaluator's
metric for it) and the average, written as Markdown and JSON.

:class:`Objective` states what "best" means when merges trade languages against each other (the
total-share sweep keeps part of the base to recover old languages at some cost to the new one):
``avg`` takes the best mean over all languages; ``old_avg`` takes the best mean over the old
languages among merges whose new-language metric stays within a limit.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from obim_trainer.checkpoints.atomic import write_atomically
from obim_trainer.evaluation import ModelEvaluator

logger = logging.getLogger(__name__)

RowKind = Literal["base", "checkpoint", "merge"]
TABLE_MD, TABLE_JSON = "comparison.md", "comparison.json"


class Objective(BaseModel):
    """How to pick one merge from several (the total-share sweep, or several methods)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["avg", "old_avg"] = Field(
        default="avg",
        description="avg: best mean over every language; old_avg: best mean over the languages other than "
        "new_language among merges whose new-language metric is within new_limit",
    )
    new_language: str | None = Field(default=None, description="The language continued pre-training added.")
    new_limit: float | None = Field(
        default=None,
        description="old_avg: the new-language metric must be at most this (a loss) or at least this (an accuracy)",
    )

    @model_validator(mode="after")
    def _old_avg_knows_the_new_language(self) -> Objective:
        if self.kind == "old_avg" and self.new_language is None:
            raise ValueError("objective old_avg needs new_language (the language continued pre-training added)")
        return self

    def describe(self) -> str:
        if self.kind == "avg":
            return "best average over all languages"
        limit = f" with {self.new_language} within {self.new_limit:g}" if self.new_limit is not None else ""
        return f"best average over the languages other than {self.new_language}{limit}"


@dataclass
class ComparisonRow:
    """One evaluated model folder."""

    name: str
    path: Path
    kind: RowKind
    metrics: dict[str, float]


@dataclass
class ComparisonTable:
    """Rows of evaluated models; ``columns`` maps each language to the metric that stands for it."""

    rows: list[ComparisonRow]
    columns: dict[str, str]
    higher_is_better: bool = False
    picked: str | None = None
    objective: Objective | None = None
    pick_reason: str | None = None
    """Why :func:`pick` chose ``picked``: the objective, or the fallback when no merge met its limit."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def languages(self) -> list[str]:
        return list(self.columns)

    def row(self, name: str) -> ComparisonRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no row named {name!r} in the comparison (rows: {', '.join(r.name for r in self.rows)})")

    def value(self, row: ComparisonRow, language: str) -> float:
        return row.metrics.get(self.columns[language], math.nan)

    def average(self, row: ComparisonRow, languages: list[str] | None = None) -> float:
        """Mean of the row's per-language values (NaN when one is missing)."""
        chosen = self.languages if languages is None else languages
        return math.fsum(self.value(row, x) for x in chosen) / len(chosen)

    def to_markdown(self) -> str:
        """A GitHub table: model, kind, one column per language, the average; the picked merge marked."""
        header = ["model", "kind", *self.languages, "avg"]
        if self.picked is not None:
            header.append("picked")
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
        for row in self.rows:
            cells = [row.name, row.kind, *(_fmt(self.value(row, x)) for x in self.languages), _fmt(self.average(row))]
            if self.picked is not None:
                cells.append("✓" if row.name == self.picked else "")
            lines.append("| " + " | ".join(cells) + " |")
        direction = "higher" if self.higher_is_better else "lower"
        metrics = ", ".join(self.columns.values())
        lines += ["", f"Per language: {metrics} ({direction} is better)."]
        if self.picked is not None and self.pick_reason is not None:
            lines.append(f"Picked **{self.picked}**: {self.pick_reason}.")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": self.columns,
            "higher_is_better": self.higher_is_better,
            "picked": self.picked,
            "objective": self.objective.model_dump() if self.objective else None,
            "pick_reason": self.pick_reason,
            "rows": [
                {"name": r.name, "kind": r.kind, "path": str(r.path), "metrics": r.metrics, "avg": self.average(r)}
                for r in self.rows
            ],
            **self.extra,
        }

    def write(self, folder: Path) -> tuple[Path, Path]:
        """``comparison.md`` and ``comparison.json`` in ``folder``, each replaced atomically."""
        md, js = folder / TABLE_MD, folder / TABLE_JSON
        write_atomically(md, self.to_markdown() + "\n")
        write_atomically(js, json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n")
        return md, js


def _fmt(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3f}"


def evaluate_folders(
    folders: Mapping[str, tuple[Path, RowKind]],
    evaluator: ModelEvaluator,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> ComparisonTable:
    """Evaluate every model folder with the same evaluator, in the given order."""
    rows = []
    for name, (path, kind) in tqdm(folders.items(), desc="evaluating", unit="model", disable=not progress):
        metrics = evaluator.evaluate_folder(path, device)
        rows.append(ComparisonRow(name=name, path=Path(path), kind=kind, metrics=metrics))
        logger.info("%s: %s", name, ", ".join(f"{k}={v:.4g}" for k, v in rows[-1].metrics.items()))
    columns = {x: evaluator.language_metric(x) for x in evaluator.languages}
    return ComparisonTable(rows=rows, columns=columns, higher_is_better=evaluator.higher_is_better)


def pick(table: ComparisonTable, objective: Objective) -> ComparisonRow:
    """The merge row that best meets ``objective``; also recorded as ``table.picked``.

    With ``old_avg`` and a limit no merge meets, the merge closest to the limit is picked (the one
    best on the new language) and a warning says so, so a sweep always yields a model.
    """
    merges = [r for r in table.rows if r.kind == "merge"]
    if not merges:
        raise ValueError("the comparison holds no merge to pick from")
    sign = -1.0 if table.higher_is_better else 1.0

    def cost(value: float) -> float:  # smaller is better; a missing value is worst
        return math.inf if math.isnan(value) else sign * value

    reason = objective.describe()
    if objective.kind == "avg":
        best = min(merges, key=lambda r: cost(table.average(r)))
    else:
        new = objective.new_language
        assert new is not None
        if new not in table.columns:
            raise ValueError(f"objective names new_language {new!r}, but the evaluated languages are {table.languages}")
        old = [x for x in table.languages if x != new]
        within = merges
        if objective.new_limit is not None:
            within = [r for r in merges if cost(table.value(r, new)) <= sign * objective.new_limit]
        if within:
            best = min(within, key=lambda r: cost(table.average(r, old)))
        else:
            best = min(merges, key=lambda r: cost(table.value(r, new)))
            reason = f"no merge keeps {new} within {objective.new_limit:g}, so the best on {new}"
            logger.warning("%s: %s", reason, best.name)
    table.picked, table.objective, table.pick_reason = best.name, objective, reason
    return best
