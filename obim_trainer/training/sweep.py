"""What the callback merges at a merge point and which merge it keeps, through the shared pipeline.

Rank 0 plans a :class:`PendingMerge` (one merge, or the candidates of a sweep) and sends it to every
rank; every rank then runs :func:`~obim_trainer.pipeline.compare.merge_evaluate_pick` on it, each
merging its share of every tensor plan and evaluating alike (the Trainer's evaluation is collective,
the OBIM evaluator runs on rank 0 and its numbers go to every rank), so every rank picks the same
merge. Rank 0 then keeps the pick as ``merged-step-N`` (:func:`keep_pick`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from obim_trainer.checkpoints.atomic import replace_folder
from obim_trainer.distributed import plain_model_loading, run_on_main
from obim_trainer.distributed.ranks import is_main_process
from obim_trainer.evaluation import ModelEvaluator
from obim_trainer.evaluation.comparison import ComparisonTable, evaluate_folders
from obim_trainer.evaluation.trainer_eval import eval_datasets, evaluate_like_checkpoints
from obim_trainer.pipeline.compare import Comparison, merge_evaluate_pick
from obim_trainer.pipeline.merge import KnownStats, MergeResult, merge_sweep_on_ranks
from obim_trainer.pipeline.variants import MergeVariant
from obim_trainer.settings.callback import OBIMConfig
from obim_trainer.settings.merge import MergeConfig
from obim_trainer.training.record import MergedModel, trainer_eval_metrics
from obim_trainer.training.selectors import Candidate

logger = logging.getLogger(__name__)

EVALUATION_TIME = "merged_evaluation_s"


@dataclass
class PendingMerge:
    """A merge rank 0 decided to make, sent to every rank: each merges a share of its tensors."""

    merged: MergedModel
    chosen: list[Candidate]
    config: MergeConfig
    """The merge of the chosen checkpoints with the callback's settings."""
    variants: list[MergeVariant]
    """What is merged: one variant named ``merged-step-N``, or the sweep's candidates."""
    root: Path
    """Where the variants are written: the OBIM folder, or ``sweep-step-N/`` for a sweep."""

    @property
    def sweep(self) -> bool:
        return self.root != self.merged.path.parent


def plan_pending(config: OBIMConfig, root: Path, step: int, chosen: list[Candidate]) -> PendingMerge:
    """The merge of ``chosen`` at ``step``: the sweep's candidates into ``sweep-step-N/``, or the one merge of
    ``method`` straight into ``merged-step-N``."""
    merged = MergedModel(step=step, path=root / f"merged-step-{step}", checkpoints=[c.step for c in chosen])
    paths = [c.merge_path for c in chosen]
    variants = config.plan_candidates(len(chosen))
    if variants is None:
        one = MergeVariant(merged.path.name, config.method, config.params)
        return PendingMerge(merged, chosen, config.merge_config(paths, merged.path), [one], root)
    sweep = root / f"sweep-step-{step}"
    return PendingMerge(merged, chosen, config.merge_config(paths, sweep), variants, sweep)


@dataclass
class CallbackEvaluator:
    """The callback's evaluation of a merged folder, as a :class:`ModelEvaluator` (called on every rank).

    The Trainer's own evaluation (``eval_<language>_loss``, collective, as the checkpoints were evaluated)
    and/or the OBIM evaluator on ``eval_data`` (``obim_<language>_loss``, on rank 0, shared with every rank).
    Its table columns are the OBIM evaluator's languages when there is one, else the Trainer's.
    """

    trainer: Any | None
    evaluator: ModelEvaluator | None
    timings: dict[str, float]
    higher_is_better: bool = False

    @property
    def languages(self) -> list[str]:
        if self.evaluator is not None:
            return self.evaluator.languages
        return [str(name) for name in eval_datasets(self.trainer) if name is not None] if self.trainer else []

    def language_metric(self, language: str) -> str:
        return self.evaluator.language_metric(language) if self.evaluator is not None else f"eval_{language}_loss"

    def evaluate_folder(self, folder: Path, device: torch.device | str = "cpu") -> dict[str, float]:
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.trainer is not None:
            metrics.update(trainer_eval_metrics(evaluate_like_checkpoints(self.trainer, folder)))
        if self.evaluator is not None:
            evaluator = self.evaluator
            metrics.update(run_on_main(lambda: evaluator.evaluate_folder(folder, device), f"evaluating {folder}"))
        self.timings[EVALUATION_TIME] = self.timings.get(EVALUATION_TIME, 0.0) + time.perf_counter() - start
        return metrics


def run_pending(
    pending: PendingMerge,
    evaluator: CallbackEvaluator | None,
    config: OBIMConfig,
    device: str,
    saliency_blocks: int,
    known_stats: KnownStats | None = None,
) -> Comparison:
    """Merge, evaluate and (for a sweep) pick, on every rank at the same point (collective).

    A sweep is evaluated by the OBIM evaluator only (``eval_data``, which a sweep requires), as before;
    one merge by the Trainer and the evaluator both. ``saliency_blocks``: decoder blocks whose saliency
    the merge's report samples for W&B (0: none); ``known_stats``: rank 0's statistics of the chosen
    checkpoints, still in memory from their saves.
    """
    if pending.sweep and evaluator is not None:
        evaluator = CallbackEvaluator(None, evaluator.evaluator, evaluator.timings)
    evaluate: Callable[[Mapping[str, Path]], ComparisonTable] | None = None
    if evaluator is not None and evaluator.languages:
        used = evaluator

        def evaluate(folders: Mapping[str, Path]) -> ComparisonTable:
            rows = {name: (path, "merge") for name, path in folders.items()}
            return evaluate_folders(rows, used, device=config.eval_device or device, progress=is_main_process())

    sweep = partial(merge_sweep_on_ranks, saliency_blocks=saliency_blocks, known_stats=known_stats)
    with plain_model_loading():
        return merge_evaluate_pick(
            [(pending.config, pending.variants)],
            pending.root,
            evaluate=evaluate,
            objective=config.objective if pending.sweep else None,
            sweep=sweep,
        )


def keep_pick(pending: PendingMerge, comparison: Comparison, keep_sweep: bool) -> MergeResult:
    """Rank 0: record the kept merge's metrics in ``pending.merged``; for a sweep move the pick to
    ``merged-step-N`` (one step: a resumed run may be redoing it) and keep or delete the rest. Returns the
    kept merge's result."""
    merged = pending.merged
    table = comparison.table
    name = pending.variants[0].name
    if pending.sweep:
        assert table is not None and comparison.best is not None
        best = comparison.best
        name = best.name
        replace_folder(best.path, merged.path)
        best.path = merged.path
        if keep_sweep:
            table.write(pending.root)
        else:
            shutil.rmtree(pending.root, ignore_errors=True)
        variant = next(v for v in pending.variants if v.name == name)
        merged.total_share, merged.variant = variant.total_share, variant.name
        logger.info("merge candidates: kept %s (%s)", name, table.pick_reason)
    if table is not None:
        merged.metrics.update(table.row(name).metrics)
    return comparison.results[name]
