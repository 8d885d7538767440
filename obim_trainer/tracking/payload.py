"""Values a run logger emits besides scalars; each backend turns them into its own types."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Table:
    """Rows under named columns (a W&B table)."""

    columns: list[str]
    rows: list[list[Any]]


@dataclass(frozen=True)
class Histogram:
    """``counts[i]`` values fell in ``[edges[i], edges[i + 1])``; ``len(edges) == len(counts) + 1``."""

    counts: list[int]
    edges: list[float]


@dataclass(frozen=True)
class Image:
    """A picture already written to ``path`` (a W&B image)."""

    path: Path


Value = float | int | Table | Histogram | Image
