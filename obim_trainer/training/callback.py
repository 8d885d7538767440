"""``OBIMCallback``: merge the best checkpoints of a Trainer run back into the base while it trains.

At every save, on the live model and with every rank taking part, the callback records the
checkpoint's activation statistics beside it (so the merge needs no extra pass over the
checkpoint) and its per-language evaluation. On rank 0 it then keeps the best checkpoints
(protected from ``save_total_limit``), merges them with the base through the offline engine
when the schedule says so, evaluates the merge, and logs it all to the W&B run the Trainer
opened. Decisions taken on rank 0 are shared with every rank. This module is glue: the work
lives in :mod:`~obim_trainer.distributed`, :mod:`~obim_trainer.evaluation`,
:mod:`~obim_trainer.training.selectors`, :mod:`~obim_trainer.training.checkpoint_guard`,
:mod:`~obim_trainer.pipeline.merge` and :mod:`~obim_trainer.tracking`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from obim_trainer.calibration import ActivationStats, CalibrationSet, stats_key, stats_path
from obim_trainer.calibration.stats_cache import StatsOrigin, record_origin
from obim_trainer.checkpoints import open_checkpoint, parse_size
from obim_trainer.checkpoints.atomic import rename_durably, replace_folder, write_atomically
from obim_trainer.checkpoints.detect import hf_format
from obim_trainer.distributed import (
    ZeroGatherer,
    plain_model_loading,
    run_on_main,
)
from obim_trainer.errors import ConfigError, OBIMError
from obim_trainer.evaluation import METRIC_PREFIX, PerLanguageEvaluator, load_eval_sets
from obim_trainer.evaluation.comparison import evaluate_folders, pick
from obim_trainer.evaluation.trainer_eval import eval_datasets, evaluate_like_checkpoints, find_trainer, rng_kept
from obim_trainer.merging import build_method
from obim_trainer.pipeline.manifest import MANIFEST_NAME
from obim_trainer.pipeline.merge import checkpoint_stats, merge_checkpoints_on_ranks, prepare_calibration
from obim_trainer.pipeline.variants import MergeVariant, merge_variants
from obim_trainer.quiet import ZeroToFp32AdviceHidden, deepspeed_deprecations_hidden
from obim_trainer.settings.callback import OBIMConfig, callback_spelling
from obim_trainer.settings.merge import MergeConfig
from obim_trainer.tracking import RunLogger, make_run_logger, summarize_merge
from obim_trainer.training.checkpoint_guard import CheckpointGuard, link_or_copy
from obim_trainer.training.run_dir import ARCHIVE_MARK, CHECKPOINT_DIR, RECORD_FILE
from obim_trainer.training.selectors import Candidate, Selector, build_selector

logger = logging.getLogger(__name__)

T = TypeVar("T")
TRAINER_TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def training_untouched(model: nn.Module | None) -> Iterator[None]:
    """Run the callback's work (statistics, evaluation, merges) without disturbing training.

    Evaluation switches the model to eval mode and merges may draw random numbers (random saliency,
    DARE's masks, data shuffling); every generator (torch CPU and CUDA, numpy, ``random``) is forked
    and every module's train/eval mode restored, so training continues bit-identically.
    """
    modes = [(module, module.training) for module in model.modules()] if model is not None else []
    with rng_kept():
        try:
            yield
        finally:
            for module, training in modes:
                module.train(training)


def trainer_eval_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The Trainer's evaluation metrics (``eval_*``, timings left out) with a perplexity for each loss."""
    kept = {
        k: float(v)
        for k, v in metrics.items()
        if k.startswith("eval_") and not k.endswith(TRAINER_TIMING_SUFFIXES) and isinstance(v, (int, float))
    }
    for name, value in list(kept.items()):
        if name.endswith("_loss"):
            kept.setdefault(name.removesuffix("_loss") + "_perplexity", math.exp(min(value, 700.0)))
    return kept


@dataclass
class MergedModel:
    step: int
    path: Path
    checkpoints: list[int]
    metrics: dict[str, float] = field(default_factory=dict)
    total_share: float | None = None
    variant: str | None = None
    """The candidate kept (``regmean@base_weight=1``) when several were compared."""


@dataclass
class PendingMerge:
    """A merge rank 0 decided to make, sent to every rank: each merges a share of its tensors."""

    merged: MergedModel
    chosen: list[Candidate]
    config: MergeConfig
    """The merge; when candidates are compared, with the sweep folder as output."""
    variants: list[MergeVariant] | None = None


class OBIMCallback(TrainerCallback):
    """Merge the best checkpoints of a run with its base (OBIM, arXiv 2502.12217) during training.

    Args:
        config: An :class:`OBIMConfig`, a mapping of its fields, or a YAML file with them.
        selector: How to pick the checkpoints to merge (default: ``config.selector`` by
            ``config.select_metric``).
        run_logger: Where records go (default: the Trainer's W&B run on the main process, if any).

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=train,
                          eval_dataset={"en": en_eval, "ja": ja_eval},
                          callbacks=[OBIMCallback(OBIMConfig(base_model="base", calibration_data="ja.jsonl",
                                                             select_metric="eval_ja_loss", top_k=3))])
    """

    def __init__(
        self,
        config: OBIMConfig | Mapping[str, Any] | str | Path,
        *,
        selector: Selector | None = None,
        run_logger: RunLogger | None = None,
    ) -> None:
        if isinstance(config, (str, Path)):
            config = OBIMConfig.from_yaml(config)
        elif not isinstance(config, OBIMConfig):
            config = OBIMConfig.build(config)
        self.config = config
        self.selector = selector or build_selector(config.selector, config.select_metric, config.select_mode)
        self._run_logger = run_logger
        self.run_logger: RunLogger = run_logger or make_run_logger(None)
        self.root = Path(self.config.output_subdir)
        self.guard = CheckpointGuard(self.root / "selected")
        self.calibration: CalibrationSet | None = None
        self.evaluator: PerLanguageEvaluator | None = None
        self.candidates: dict[int, Candidate] = {}
        self.selected: list[int] = []
        self.merged: list[MergedModel] = []
        self.latest_merge: Path | None = None
        self._trainer_metrics: dict[int, dict[str, float]] = {}
        self._recorded_steps: set[int] = set()
        self._saves = 0
        self._needs_stats = True
        self._device = "cpu"
        self._trainer: Callable[[], Any] = lambda: None
        self._metric_checked = False
        self._advice_hidden = ZeroToFp32AdviceHidden()

    # ---- Trainer events ----

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.root = Path(args.output_dir) / self.config.output_subdir
        self.guard = CheckpointGuard(self.root / "selected")
        self.run_logger = self._run_logger or make_run_logger(args.report_to)
        self._device = str(args.device)
        self._trainer = find_trainer(self) or (lambda: None)
        if self._trainer() is None and self.config.eval_data is None:
            logger.warning(
                "OBIMCallback is not called by a transformers Trainer it can evaluate with, and eval_data is "
                "not set: merges will not be evaluated; set eval_data={language: file}"
            )
        self._check_setup(args)
        if self.config.consolidate_checkpoints:  # the callback writes the weights that advice is about
            self._advice_hidden.start()
        with deepspeed_deprecations_hidden():
            self._begin(args, state, kwargs.get("model"))

    def _begin(self, args: TrainingArguments, state: TrainerState, model: nn.Module | None) -> None:
        calibration, eval_sets = run_on_main(self._prepare_data, "preparing OBIM calibration and evaluation data")
        self.calibration = calibration
        self.evaluator = PerLanguageEvaluator(eval_sets, batch_size=self.config.eval_batch_size) if eval_sets else None
        if state.global_step > 0:
            output_dir = Path(args.output_dir)
            resumed = output_dir / f"checkpoint-{state.global_step}"
            if model is not None and resumed.is_dir():
                # the run may have stopped before the callback wrote this checkpoint's ZeRO-3 weights; the live
                # model holds exactly them now (the Trainer loaded the checkpoint before this event)
                self._ensure_weights(model, resumed)
            self.latest_merge = run_on_main(
                lambda: self._resume(state.global_step, output_dir), "reading the OBIM record"
            )
        else:
            run_on_main(self._archive_previous_record, "archiving the OBIM record of an earlier run")

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if metrics:  # with a dict eval_dataset, the Trainer reports one language at a time
            self._trainer_metrics.setdefault(state.global_step, {}).update(trainer_eval_metrics(metrics))

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Record the checkpoint just saved, select and merge (see :meth:`_record_save`), without disturbing
        training."""
        step = state.global_step
        if step in self._recorded_steps or model is None:
            return
        self._recorded_steps.add(step)
        with training_untouched(model), deepspeed_deprecations_hidden():
            self._record_save(args, step, model)

    def _record_save(self, args: TrainingArguments, step: int, model: nn.Module) -> None:
        """Weights, statistics, evaluation and selection of the checkpoint just saved; the merge if due."""
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        device = torch.device(args.device)
        timings: dict[str, float] = {}
        with _timed(timings, "consolidate_s"):
            self._ensure_weights(model, folder)
        stats = None
        if self.calibration is not None:
            with _timed(timings, "statistics_s"):
                stats = ActivationStats.collect(
                    model,
                    self.calibration,
                    batch_size=self.config.calibration_batch_size,
                    device=device,
                    progress=False,
                    across_ranks=True,
                )
        with _timed(timings, "evaluation_s"):
            metrics = dict(self._trainer_metrics.pop(step, {}))
            if self.evaluator is not None:
                metrics.update(self.evaluator.evaluate_model(model, device))
        self._check_select_metric(metrics)
        self._saves += 1
        candidate = Candidate(step=step, path=folder, metrics=metrics)
        pending = self._guarded(lambda: self._after_save(candidate, stats), f"OBIM selection at step {step}")
        self._merge_and_record(step, pending, timings)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """The final merge and loading it if asked (see :meth:`_end`), without disturbing training."""
        self._advice_hidden.stop()
        with training_untouched(model), deepspeed_deprecations_hidden():
            self._end(state.global_step, model)

    def _end(self, step: int, model: nn.Module | None) -> None:
        if self.config.merge_at_end:
            pending = self._guarded(lambda: self._pending_merge(step), "planning the final OBIM merge")
            if pending is not None:
                self._merge_and_record(step, pending, {})
        if self.config.load_merged_at_end and model is not None:
            if self.latest_merge is None:
                logger.warning("load_merged_at_end: no merge was made, the model keeps its trained weights")
            else:
                ZeroGatherer(model).load_checkpoint(self.latest_merge)

    # ---- every rank ----

    def _check_setup(self, args: TrainingArguments) -> None:
        config = self.config
        # activation statistics are recorded on the live model at each save; Grams, Fisher diagonals and the
        # layer-by-layer merge read the saved checkpoints at merge time, for the selected ones only
        variants = config.plan_candidates(config.top_k) or [MergeVariant(config.method, config.method, config.params)]
        self._needs_stats = any(
            build_method(v.method, v.params, num_models=config.top_k).statistics().activations for v in variants
        )
        if config.select_metric.startswith(METRIC_PREFIX) and config.eval_data is None:
            raise ConfigError(
                f"select_metric '{config.select_metric}' comes from the OBIM evaluator, which has no eval_data; "
                "give eval_data={language: file} or select by a Trainer metric such as eval_loss"
            )
        if config.selector == "top_k" and config.select_metric.startswith("eval_") and args.eval_strategy == "no":
            raise ConfigError(
                f"select_metric '{config.select_metric}' is a Trainer evaluation metric but eval_strategy is 'no'; "
                "set eval_strategy (with eval_steps equal to save_steps) or select by an obim_<language>_loss metric"
            )

    def _check_select_metric(self, metrics: Mapping[str, float]) -> None:
        """At the first save evaluated by the family of ``select_metric`` (the Trainer's ``eval_*`` or the
        evaluator's), fail unless the metric is there: otherwise the run trains to the end and never merges.
        Every rank has the same metrics, so every rank raises alike."""
        metric = getattr(self.selector, "metric", None)
        family = [m for m in metrics if m.startswith("eval_") == metric.startswith("eval_")] if metric else []
        if self._metric_checked or not family:
            return
        self._metric_checked = True
        if metric not in metrics:
            raise ConfigError(
                f"select_metric '{metric}' is not among the metrics of the first evaluated save "
                f"({', '.join(sorted(metrics))}); set select_metric to one of them"
            )

    def _prepare_data(self) -> tuple[CalibrationSet | None, dict[str, CalibrationSet] | None]:
        """Calibration and evaluation samples, tokenized once on rank 0 and sent to every rank."""
        from transformers import AutoTokenizer

        config = self.config
        if not (config.base_model / "config.json").is_file():
            raise ConfigError(
                f"base_model {config.base_model} has no config.json; give the folder of the model the run started from"
            )
        calibration = None
        if self._needs_stats:
            # prepare_calibration reads only the calibration and tokenizer fields of the merge configuration
            calibration = prepare_calibration(config.merge_config([config.base_model], None))
        eval_sets = None
        if config.eval_data is not None:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_source or config.base_model)
            eval_sets = load_eval_sets(
                config.eval_data,
                tokenizer,
                max_samples=config.eval_samples,
                max_length=config.eval_max_length,
                text_field=config.eval_text_field,
            )
        return calibration, eval_sets

    def _ensure_weights(self, model: nn.Module, folder: Path) -> None:
        """Write Hugging Face weights into a checkpoint that has none (ZeRO-3 without 16-bit gathering)."""
        if run_on_main(lambda: hf_format(folder) is not None, f"looking for model weights in {folder}"):
            return
        if not self.config.consolidate_checkpoints:
            raise ConfigError(
                f"{folder} holds no model weights (DeepSpeed ZeRO-3 with stage3_gather_16bit_weights_on_model_save "
                "off?); set consolidate_checkpoints=True or turn that DeepSpeed option on"
            )
        ZeroGatherer(model).write_checkpoint(folder, parse_size(self.config.out_shard_size))

    def _guarded(self, fn: Callable[[], T], what: str, *, everywhere: bool = False) -> T | None:
        """Run rank-0 work (``everywhere``: work of every rank) and give every rank its result; with
        ``on_error='warn'`` a failure is logged, every rank gets ``None`` and training goes on."""
        try:
            with callback_spelling():  # errors name OBIMConfig's keys, as in the callback's YAML
                return fn() if everywhere else run_on_main(fn, what)
        except Exception as exc:  # raised on every rank alike (see run_on_main), so all go on together
            if self.config.on_error == "raise":
                raise
            # a user's error says what to fix; anything else is a bug whose traceback is the only lead
            trace = None if isinstance(exc, OBIMError) else exc
            logger.error("%s failed, training goes on: %s", what, exc, exc_info=trace)
            return None

    def _merge_and_record(self, step: int, pending: PendingMerge | None, timings: dict[str, float]) -> None:
        """Make the merge rank 0 planned, every rank merging its share of the tensors; then, on rank 0,
        evaluate it, log and record. Every rank calls this at the same point."""
        made = None
        if pending is not None:
            made = self._guarded(
                lambda: self._merge_files(pending, timings), f"the OBIM merge at step {step}", everywhere=True
            )
        if made and pending is not None and pending.variants is None:
            metrics = self._guarded(
                lambda: self._evaluate_in_trainer(pending.merged.path, timings),
                f"evaluating the OBIM merge at step {step} with the Trainer",
                everywhere=True,
            )
            pending.merged.metrics.update(metrics or {})
        latest = self._guarded(
            lambda: self._after_merge(step, pending if made else None, timings), "recording the merge"
        )
        self.latest_merge = latest if latest is not None else self.latest_merge

    def _evaluate_in_trainer(self, folder: Path, timings: dict[str, float]) -> dict[str, float]:
        """The merge's evaluation under the Trainer's own metric names, on its eval datasets (collective)."""
        trainer = self._trainer()
        if trainer is None or not eval_datasets(trainer):
            return {}
        with _timed(timings, "merged_evaluation_s"):
            return trainer_eval_metrics(evaluate_like_checkpoints(trainer, folder))

    # ---- rank 0 ----

    def _after_save(self, candidate: Candidate, stats: ActivationStats | None) -> PendingMerge | None:
        """Record the checkpoint, update the selection and say which merge to make now, if any."""
        step = candidate.step
        candidate.protected = self.guard.protect(candidate.path, step)
        if stats is not None:
            candidate.stats_key = self._store_stats(stats, candidate)
        self.candidates[step] = candidate
        self.run_logger.log_checkpoint(step, candidate.metrics)
        changed = self._select(step)
        every = self.config.merge_every_saves
        if (every and self._saves % every == 0) or (changed and self.config.merge_on_change):
            return self._pending_merge(step)
        return None

    def _after_merge(self, step: int, pending: PendingMerge | None, timings: dict[str, float]) -> Path | None:
        """Evaluate and log a merge just made (if any), log the step's timings and write the record."""
        if pending is not None:
            self._complete_merge(pending, timings)
        if pending is not None or timings:
            self.run_logger.log_timings(step, timings)
            self._write_record()
        return self.latest_merge

    def _store_stats(self, stats: ActivationStats, candidate: Candidate) -> str:
        """Store the statistics under the key the offline merge computes for this checkpoint's weights.

        The key comes from the protected copy, which holds exactly the Hugging Face weights the merge
        reads; the file is linked beside the original too, where it serves every reader of the same files.
        """
        assert self.calibration is not None and candidate.protected is not None
        with open_checkpoint(candidate.protected) as reader:
            fingerprint = reader.fingerprint()
        key = stats_key(self.calibration.fingerprint(), fingerprint)
        stored = stats_path(candidate.protected, key)
        stats.save(stored, key)
        beside = stats_path(candidate.path, key)
        beside.parent.mkdir(exist_ok=True)
        link_or_copy(str(stored), str(beside))
        for path in (stored, beside):  # what an offline merge compares its own calibration with
            record_origin(path, StatsOrigin.of(self.calibration, candidate.protected, fingerprint))
        return key

    def _select(self, step: int) -> bool:
        """Update the selection; protected copies of checkpoints that are not selected are released.

        True when the selected set changed.
        """
        available = [c for c in self.candidates.values() if c.available]
        chosen = [c.step for c in self.selector.select(available, self.config.top_k)]
        for candidate in self.candidates.values():
            if candidate.step in chosen and candidate.protected is None:
                candidate.protected = self.guard.protect(candidate.path, candidate.step)
            elif candidate.step not in chosen and candidate.protected is not None:
                self.guard.release(candidate.step)
                candidate.protected = None
        changed = set(chosen) != set(self.selected)
        self.selected = chosen
        self.run_logger.log_candidates(step, list(self.candidates.values()), self._selected_candidates())
        return changed

    def _selected_candidates(self) -> list[Candidate]:
        return [self.candidates[s] for s in self.selected]

    def _pending_merge(self, step: int) -> PendingMerge | None:
        """The merge of the selected checkpoints, unless too few are selected or the last merge had the same ones."""
        chosen = self._selected_candidates()
        if len(chosen) < self.config.min_checkpoints:
            logger.info("%d checkpoint(s) selected, fewer than min_checkpoints; no merge yet", len(chosen))
            return None
        if self.merged and self.merged[-1].checkpoints == self.selected:
            logger.info("checkpoints %s are already merged in %s", self.selected, self.merged[-1].path)
            return None
        merged = MergedModel(step=step, path=self.root / f"merged-step-{step}", checkpoints=[c.step for c in chosen])
        paths = [c.merge_path for c in chosen]
        variants = self.config.plan_candidates(len(chosen))
        if variants is None:
            return PendingMerge(merged, chosen, self.config.merge_config(paths, merged.path))
        return PendingMerge(merged, chosen, self.config.merge_config(paths, self._sweep_root(step)), variants)

    def _sweep_root(self, step: int) -> Path:
        return self.root / f"sweep-step-{step}"

    def _merge_files(self, pending: PendingMerge, timings: dict[str, float]) -> bool:
        """Write the merged folder(s), every rank merging its share of the tensors (collective)."""
        with _timed(timings, "merge_s"), plain_model_loading():
            if pending.variants is None:
                merge_checkpoints_on_ranks(pending.config)
            else:
                assert pending.config.output is not None
                merge_variants(
                    pending.config, pending.variants, pending.config.output, merge=merge_checkpoints_on_ranks
                )
        return True

    def _complete_merge(self, pending: PendingMerge, timings: dict[str, float]) -> None:
        """Evaluate the merge just made (for a sweep: pick one), keep it and log it."""
        merged, chosen = pending.merged, pending.chosen
        variant = self._pick_from_sweep(pending, timings) if pending.variants else self._evaluate(merged, timings)
        self.merged.append(merged)
        self.latest_merge = merged.path
        self._prune_merged()
        self.run_logger.log_merge(merged.step, merged.metrics, chosen)
        if self.run_logger.enabled and self.config.log_saliency:
            with _timed(timings, "summary_s"):
                manifest = json.loads((merged.path / MANIFEST_NAME).read_text())
                self._log_summary(merged.step, chosen, variant, manifest.get("ownership_share"))
        losses = ", ".join(f"{k} {v:.4f}" for k, v in sorted(merged.metrics.items()) if k.endswith("_loss"))
        losses = f" ({losses})" if losses else ""
        logger.info("merged checkpoints %s into %s%s", merged.checkpoints, merged.path, losses)

    def _evaluate(self, merged: MergedModel, timings: dict[str, float]) -> MergeVariant:
        """Evaluate the merged folder; returns the merge made."""
        if self.evaluator is not None:
            with _timed(timings, "merged_evaluation_s"):
                device = self.config.eval_device or self._device
                merged.metrics.update(self.evaluator.evaluate_folder(merged.path, device))
        return MergeVariant(self.config.method, self.config.method, self.config.params)

    def _pick_from_sweep(self, pending: PendingMerge, timings: dict[str, float]) -> MergeVariant:
        """Evaluate every candidate's merge in ``sweep-step-N/`` and move the one the objective picks to
        ``merged.path``; returns the pick."""
        assert self.evaluator is not None and pending.variants is not None
        merged = pending.merged
        root = self._sweep_root(merged.step)
        folders = {v.name: root / v.name for v in pending.variants}
        with _timed(timings, "merged_evaluation_s"):
            device = self.config.eval_device or self._device
            table = evaluate_folders({n: (p, "merge") for n, p in folders.items()}, self.evaluator, device=device)
        best = pick(table, self.config.objective)
        variant = next(v for v in pending.variants if v.name == best.name)
        replace_folder(best.path, merged.path)  # one step: a resumed run may be redoing this one
        best.path = merged.path
        if self.config.keep_sweep:
            table.write(root)
        else:
            shutil.rmtree(root, ignore_errors=True)
        merged.metrics, merged.total_share, merged.variant = best.metrics, variant.total_share, variant.name
        self.run_logger.log_sweep(merged.step, table)
        logger.info("merge candidates: kept %s (%s)", best.name, table.pick_reason)
        return variant

    def _log_summary(
        self, step: int, chosen: list[Candidate], variant: MergeVariant, ownership_share: list[float] | None
    ) -> None:
        method = build_method(variant.method, variant.params, num_models=len(chosen))
        stats = [c.load_stats() for c in chosen]
        layers = summarize_merge(
            self.config.base_model,
            [c.merge_path for c in chosen],
            method,
            stats,
            seed=self.config.seed,
            blocks=self.config.saliency_blocks,
        )
        self.run_logger.log_merge_summary(step, layers, chosen, ownership_share, bins=self.config.histogram_bins)

    def _prune_merged(self) -> None:
        while len(self.merged) > self.config.keep_merged:
            old = self.merged.pop(0)
            shutil.rmtree(old.path, ignore_errors=True)
            logger.info("deleted %s (keep_merged=%d)", old.path, self.config.keep_merged)

    def _write_record(self) -> None:
        """``<output_dir>/obim/candidates.json``: what was evaluated, selected and merged (read on resume)."""
        record = {
            "select_metric": self.config.select_metric,
            "candidates": [c.to_dict() for c in sorted(self.candidates.values(), key=lambda c: c.step)],
            "selected": self.selected,
            "merged": [{**m.__dict__, "path": str(m.path)} for m in self.merged],
            "saves": self._saves,
        }
        write_atomically(self.root / RECORD_FILE, json.dumps(record, indent=2) + "\n")

    def _archive_previous_record(self) -> None:
        """A fresh run (step 0) into an ``output_dir`` with an OBIM folder: move it aside.

        Its record, kept copies and merges belong to the earlier run, whose checkpoints this run overwrites
        (a kept ``selected/checkpoint-N`` would even be taken for this run's), so the folder is renamed (one
        atomic step) to ``<output_subdir>.previous-<UTC time>`` rather than mixed in.
        """
        if not self.root.is_dir() or not any(self.root.iterdir()):
            return
        archive = self.root.with_name(f"{self.root.name}{ARCHIVE_MARK}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        rename_durably(self.root, archive)
        logger.warning(
            "%s holds the OBIM record of an earlier run; this run starts at step 0, so it was moved to %s "
            "(to continue that run instead, resume it: resume_from_checkpoint=True)",
            self.root,
            archive,
        )

    def _resume(self, global_step: int, output_dir: Path) -> Path | None:
        """Pick up the record of the run being resumed (candidates up to ``global_step``), then record every
        checkpoint the run saved but did not record (it stopped during that save)."""
        self._read_record(global_step)
        self._record_unrecorded(global_step, output_dir)
        self.latest_merge = self.merged[-1].path if self.merged else None
        return self.latest_merge

    def _read_record(self, global_step: int) -> None:
        file = self.root / RECORD_FILE
        if not file.is_file():
            return
        try:
            record = json.loads(file.read_text())
            candidates = [Candidate.from_dict(c) for c in record["candidates"]]
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable %s (%s); selection starts afresh", file, exc)
            return
        self.candidates = {c.step: c for c in candidates if c.step <= global_step}
        self.selected = [s for s in record.get("selected", []) if s in self.candidates]
        self.merged = [
            MergedModel(m["step"], Path(m["path"]), m["checkpoints"], m.get("metrics", {}), m.get("total_share"))
            for m in record.get("merged", [])
            if m["step"] <= global_step and Path(m["path"]).is_dir()
        ]
        self._saves = int(record.get("saves", len(self.candidates)))
        logger.info("resumed the OBIM record: %d candidates, selected %s", len(self.candidates), self.selected)

    def _record_unrecorded(self, global_step: int, output_dir: Path) -> None:
        """Record (statistics, evaluation, protected copy) each ``checkpoint-N`` up to ``global_step`` missing
        from the record, before checkpoint rotation can delete it."""
        steps = []
        for folder in sorted(output_dir.glob("checkpoint-*"), key=lambda p: p.name):
            match = CHECKPOINT_DIR.match(folder.name)
            step = int(match.group(1)) if match else None
            if step is None or step > global_step or step in self.candidates:
                continue
            if hf_format(folder) is None:  # stopped before the callback wrote its ZeRO-3 weights
                logger.warning("%s holds no model weights; it cannot be recorded and is not a candidate", folder)
                continue
            self.candidates[step] = self._recorded_afterwards(step, folder)
            self._saves += 1
            steps.append(step)
        if steps:
            self._select(global_step)
            self._write_record()
            logger.warning(
                "checkpoint(s) at step(s) %s were saved but not recorded by OBIM (the run stopped during the save); "
                "recorded them now from their files and trainer_state.json; selected %s",
                steps,
                self.selected,
            )

    def _recorded_afterwards(self, step: int, folder: Path) -> Candidate:
        """A candidate made from a checkpoint's files: the Trainer's evaluation logged at its step, the
        evaluator's (if any) and its statistics computed on its weights, as the merge would compute them."""
        state_file = folder / "trainer_state.json"
        history = json.loads(state_file.read_text()).get("log_history", []) if state_file.is_file() else []
        metrics: dict[str, float] = {}
        for entry in history:
            if entry.get("step") == step:
                metrics.update(trainer_eval_metrics(entry))
        if self.evaluator is not None:
            metrics.update(self.evaluator.evaluate_folder(folder, self.config.eval_device or self._device))
        candidate = Candidate(step=step, path=folder, metrics=metrics)
        candidate.protected = self.guard.protect(folder, step)
        if self.calibration is not None:
            config = self.config.merge_config([self.config.base_model], None)
            with open_checkpoint(candidate.protected) as reader, plain_model_loading():
                _, info = checkpoint_stats(reader, self.calibration, config, torch.device(self._device))
            candidate.stats_key = info["key"]
        return candidate
