"""The demo's figures (matplotlib, written as PNG without a display).

* loss per language over the continued-pretraining steps, the base as a horizontal line and
  each merge as a marker after the last step — forgetting and its recovery at a glance;
* the share of each decoder block that each merged checkpoint owns (OBIM's rotating order);
* the total-share sweep as a trade-off curve: new-language loss against the old languages'
  average loss, with the other merges as points.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Point:
    """One model on the trade-off plot."""

    name: str
    new_loss: float
    old_loss: float
    sweep: bool = False


OFF_SCALE = 1.5  # losses above this multiple of the worst base/checkpoint loss are drawn at the top edge


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=120, bbox_inches="tight")
    _pyplot().close(figure)
    os.replace(tmp, path)
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


def plot_tradeoff(points: Sequence[Point], new_language: str, path: Path) -> Path:
    """Old-language average loss against new-language loss; the sweep points (the base is its end,
    total share 0) joined by a line, labels alternating above and below so neighbours stay legible."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(5.5, 4.2))
    sweep = sorted((p for p in points if p.sweep), key=lambda p: p.new_loss)
    if sweep:
        ax.plot([p.new_loss for p in sweep], [p.old_loss for p in sweep], "-o", color="tab:red", label="OBIM sweep")
    for i, p in enumerate(sorted(points, key=lambda p: (p.new_loss, p.old_loss))):
        if not p.sweep:
            ax.plot([p.new_loss], [p.old_loss], "o", color="tab:gray")
        offset = (3, 3) if i % 2 == 0 else (3, -9)
        ax.annotate(p.name, (p.new_loss, p.old_loss), fontsize="x-small", xytext=offset, textcoords="offset points")
    ax.set_xlabel(f"{new_language} loss (new language)")
    ax.set_ylabel("old languages' average loss")
    ax.set_title("Keeping part of the base: the trade-off")
    if sweep:
        ax.legend(fontsize="small")
    return _save(figure, path)
