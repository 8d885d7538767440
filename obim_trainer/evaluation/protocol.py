"""What comparison tables, sweeps and the demo need from an evaluator.

The project's :class:`~obim_trainer.evaluation.PerLanguageEvaluator` (next-token loss, lower is
better) and the lm-eval-harness adapter (task accuracy, higher is better) both qualify, so every
table and every pick by an objective works with either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ModelEvaluator(Protocol):
    """Scores a model folder per language."""

    higher_is_better: bool
    """Whether a larger value of :meth:`language_metric` is better (accuracy) or worse (loss)."""

    @property
    def languages(self) -> list[str]:
        """The languages evaluated, in table order."""
        ...

    def language_metric(self, language: str) -> str:
        """The name of the one metric that stands for ``language`` in tables and objectives."""
        ...

    def evaluate_folder(self, folder: Path, device: torch.device | str = "cpu") -> dict[str, float]:
        """Every metric of the model in ``folder`` (a Hugging Face model folder)."""
        ...
