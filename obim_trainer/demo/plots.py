"""The demo's figures (matplotlib, written as PNG without a display).

* loss per language over the continued-pretraining steps, the base as a horizontal line and
  each merge as a marker after the last step — forgetting and its recovery at a glance;
* the share of each decoder block that each merged checkpoint owns (OBIM's rotating order);
* the trade-off: new-language loss against the old languages' average loss for every merge, the
  merges of one family (OBIM's total shares, RegMean's base weights, ...) joined in one curve.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obim_trainer.checkpoints.atomic import atomic_output_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Point:
    """One model on the trade-off plot: a merge of some family (one curve), the base or a checkpoint."""

    name: str
    new_loss: float
    old_loss: float
    family: str | None = None
    """The curve the merge belongs to (e.g. ``regmean`` for its base weights); ``None`` for base and checkpoints."""
    picked: bool = False
    base: bool = False


OFF_SCALE = 1.5  # losses above this multiple of the worst base/checkpoint loss are drawn at the top edge


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    try:
        with atomic_output_file(path) as partial:
            figure.savefig(partial, format=path.suffix.lstrip("."), dpi=120, bbox_inches="tight")
    finally:
        _pyplot().close(figure)
    return path


def plot_losses(
    curves: Mapping[str, Mapping[int, float]],
    base: Mapping[str, float],
    merges: Mapping[str, Mapping[str, float]],
    path: Path,
) -> Path:
    """One panel per language: checkpoint loss by step, the base's loss, and each merge's loss."""
    plt = _pyplot()
    languages = list(curves)
    figure, axes = plt.subplots(1, len(languages), figsize=(4.2 * len(languages), 3.6), squeeze=False)
    last = max(step for curve in curves.values() for step in curve)
    markers = "oD^vs*Xp<>h"
    for ax, language in zip(axes[0], languages, strict=True):
        steps = sorted(curves[language])
        ax.plot(steps, [curves[language][s] for s in steps], "-", color="tab:blue", label="checkpoints")
        ax.axhline(base[language], color="black", linestyle="--", label="base")
        top = OFF_SCALE * max(base[language], *curves[language].values())
        highest = max(base[language], *curves[language].values(), *(min(m[language], top) for m in merges.values()))
        for i, (name, losses) in enumerate(merges.items()):
            x, y = last * (1.04 + 0.02 * i), losses[language]
            ax.plot([x], [min(y, top)], markers[i % len(markers)], label=name)
            if y > top:  # a merge that broke the model would squash every other line
                ax.annotate(
                    f"{y:.1f}",
                    (x, top),
                    fontsize="xx-small",
                    rotation=90,
                    xytext=(0, 4),
                    textcoords="offset points",
                    ha="center",
                )
        ax.set_ylim(top=highest * 1.08)
        ax.set_title(language)
        ax.set_xlabel("continued-pretraining step")
        ax.set_ylabel("loss")
    axes[0][-1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(figure, path)


def plot_ownership(shares: Mapping[str, Sequence[float]], labels: Sequence[str], path: Path) -> Path:
    """Stacked bars: for each group (decoder block), the share of positions each checkpoint owns."""
    plt = _pyplot()
    groups = list(shares)
    figure, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(groups) + 2), 3.6))
    bottom = [0.0] * len(groups)
    for k, label in enumerate(labels):
        heights = [shares[g][k] for g in groups]
        ax.bar(groups, heights, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("share of positions")
    ax.set_ylim(0, 1)
    ax.set_title("OBIM: which checkpoint owns each position")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.tick_params(axis="x", rotation=45)
    return _save(figure, path)


def value_label(point: Point) -> str:
    """What a point of a curve is labelled with: what sets it apart within its family (``0.3`` for
    ``regmean@base_weight=0.3``, ``0.6`` for ``obim@0.6``, ``1`` for plain ``obim``'s share)."""
    family = point.family or ""
    rest = point.name[len(family) :].lstrip("@") if point.name.startswith(family) else point.name
    if not rest:
        return "1"  # a family's plain member is its total share 1 (the only unnamed point of a curve)
    return ",".join(part.split("=", 1)[-1] for part in rest.split("@"))


LABEL_RADII = (5.0, 11.0, 18.0, 27.0, 38.0, 52.0, 70.0)  # points
LABEL_ANGLES = (45, 135, -45, -135, 0, 180, 90, -90, 20, 160, -20, -160)


def place_labels(
    ax: Any,
    anchors: Sequence[tuple[str, float, float]],
    obstacles: Sequence[tuple[float, float]] = (),
    fontsize: str = "x-small",
) -> list[Any]:
    """Annotate each anchor (text, x, y) where its text overlaps no other label, no marker (the anchors'
    and the ``obstacles``' points) and stays in the axes: candidate offsets on rings of growing radius
    around the point, the first free one wins (a thin leader line from the second ring on). Returns the
    placed texts' display boxes."""
    figure = ax.figure
    renderer = figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    markers = [_marker_box(ax, x, y) for x, y in [*((x, y) for _, x, y in anchors), *obstacles]]
    placed: list[Any] = []
    for text, x, y in anchors:
        candidate = None
        for radius in LABEL_RADII:
            for angle in LABEL_ANGLES:
                dx, dy = radius * math.cos(math.radians(angle)), radius * math.sin(math.radians(angle))
                candidate = _annotate(ax, text, x, y, dx, dy, radius, fontsize)
                box = _text_box(candidate, renderer)
                free = not any(box.overlaps(b) for b in [*placed, *markers])
                if free and frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1):
                    break
                candidate.remove()
                candidate = None
            if candidate is not None:
                break
        if candidate is None:  # nowhere free: the first ring, overlapping; rare with this many points
            candidate = _annotate(ax, text, x, y, LABEL_RADII[0], LABEL_RADII[0], LABEL_RADII[0], fontsize)
            logger.warning("no free place for the label %r at (%g, %g); it may overlap another", text, x, y)
        placed.append(_text_box(candidate, renderer))
    return placed


def _text_box(annotation: Any, renderer: Any) -> Any:
    """The display box of an annotation's text alone (its leader line may cross other points)."""
    from matplotlib.text import Text

    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer)


def _marker_box(ax: Any, x: float, y: float, half: float = 3.0) -> Any:
    from matplotlib.transforms import Bbox

    cx, cy = ax.transData.transform((x, y))
    pixels = half * ax.figure.dpi / 72
    return Bbox.from_extents(cx - pixels, cy - pixels, cx + pixels, cy + pixels)


def _annotate(ax: Any, text: str, x: float, y: float, dx: float, dy: float, radius: float, fontsize: str) -> Any:
    ha = "left" if dx > 0.5 else "right" if dx < -0.5 else "center"
    va = "bottom" if dy > 0.5 else "top" if dy < -0.5 else "center"
    arrow = {"arrowstyle": "-", "color": "0.6", "lw": 0.5} if radius > LABEL_RADII[1] else None
    return ax.annotate(
        text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, ha=ha, va=va, arrowprops=arrow
    )


MARKERS = "oDs^vP<>hXp*d"


def tradeoff_figure(points: Sequence[Point], new_language: str) -> Any:
    """The trade-off figure: each family's merges joined in a line in the given order (one legend entry
    per family), the base's old-language loss as a dashed line (its new-language loss is far to the
    right), the last checkpoint as a black square, the objective's pick ringed; points far beyond the
    base and the checkpoints are listed under the plot instead of squashing it."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(8.5, 5.6))
    references = [p for p in points if p.family is None]
    limit_x = OFF_SCALE * max((p.new_loss for p in references), default=math.inf)
    limit_y = OFF_SCALE * max((p.old_loss for p in references), default=math.inf)
    shown = [p for p in points if p.new_loss <= limit_x and p.old_loss <= limit_y and not p.base]
    hidden = [p for p in points if p not in shown and not p.base]
    _draw_families(ax, shown)
    for p in (p for p in references if p.base):
        label = f"{p.name} ({new_language} {p.new_loss:.2f}, old {p.old_loss:.2f})"
        ax.axhline(p.old_loss, color="black", linestyle="--", linewidth=1, label=label)
    for p in (p for p in shown if p.family is None):
        ax.plot([p.new_loss], [p.old_loss], "s", color="black", markersize=8, label=p.name)
    for p in (p for p in shown if p.picked):
        ax.plot([p.new_loss], [p.old_loss], "o", mfc="none", mec="red", markersize=14, mew=1.5, label="picked")
    ax.margins(0.06)
    ax.set_xlabel(f"{new_language} loss (new language)")
    ax.set_ylabel("old languages' average loss")
    ax.set_title("Forgetting against learning: every merge of the same checkpoints")
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_xlim(ax.get_xlim())  # fixed before labels are placed, so the points stay where the labels expect
    ax.set_ylim(ax.get_ylim())
    curves = [m for m in _families(shown).values() if len(m) > 1]
    place_labels(
        ax,
        [(value_label(p), p.new_loss, p.old_loss) for m in curves for p in m],
        [(p.new_loss, p.old_loss) for p in shown],
    )
    if hidden:
        note = "off scale: " + ", ".join(f"{p.name} ({p.new_loss:.2f}, {p.old_loss:.2f})" for p in hidden)
        figure.text(0.01, -0.02, note, fontsize="x-small", wrap=True, va="top")
    return figure


def _families(points: Sequence[Point]) -> dict[str, list[Point]]:
    families: dict[str, list[Point]] = {}
    for p in points:
        if p.family is not None:
            families.setdefault(p.family, []).append(p)
    return families


def _draw_families(ax: Any, points: Sequence[Point]) -> None:
    """One legend entry per family: its points joined in a line (a lone marker for a single merge)."""
    colors = _pyplot().get_cmap("tab10").colors
    for i, (family, members) in enumerate(_families(points).items()):
        ax.plot(
            [p.new_loss for p in members],
            [p.old_loss for p in members],
            ("-" if len(members) > 1 else "") + MARKERS[i % len(MARKERS)],
            color=colors[i % len(colors)],
            markersize=5,
            label=family,
        )


def plot_tradeoff(points: Sequence[Point], new_language: str, path: Path) -> Path:
    """Write :func:`tradeoff_figure` to ``path`` (PNG)."""
    return _save(tradeoff_figure(points, new_language), path)
