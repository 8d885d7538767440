"""``OBIMCallback``: merge the best checkpoints of a Trainer run back into the base while it trains.

At every save, on the live model and with every rank taking part, the callback records the
checkpoint's activation statistics beside it (so the merge needs no extra pass over the
checkpoint) and its per-language evaluation. On rank 0 it then keeps the best checkpoints
(protected from ``save_total_limit``) and, when the schedule says so, every rank merges them with
the base, evaluates and picks through the shared pipeline; rank 0 logs it all to the W&B run the
Trainer opened. This module is the Trainer-event glue; each rank's state and work live in
:mod:`~obim_trainer.training.setup` (checks and data before training),
:mod:`~obim_trainer.training.schedule` (when to merge), :mod:`~obim_trainer.training.record`
(``candidates.json``, resume, archive), :mod:`~obim_trainer.training.sweep` (what to merge and which
merge to keep), :mod:`~obim_trainer.training.selectors`, :mod:`~obim_trainer.training.checkpoint_guard`,
:mod:`~obim_trainer.distributed`, :mod:`~obim_trainer.evaluation` and :mod:`~obim_trainer.tracking`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from obim_trainer.calibration import ActivationStats, CalibrationSet
from obim_trainer.checkpoints import parse_size
from obim_trainer.checkpoints.detect import hf_format
from obim_trainer.distributed import ZeroGatherer, run_on_main
from obim_trainer.errors import ConfigError, OBIMError
from obim_trainer.evaluation import PerLanguageEvaluator
from obim_trainer.evaluation.trainer_eval import eval_datasets, find_trainer, rng_kept
from obim_trainer.pipeline.compare import Comparison
from obim_trainer.quiet import ZeroToFp32AdviceHidden, deepspeed_deprecations_hidden
from obim_trainer.settings.callback import OBIMConfig, callback_spelling
from obim_trainer.tracking import RunLogger, make_run_logger, summarize_report
from obim_trainer.training.checkpoint_guard import CheckpointGuard
from obim_trainer.training.record import (
    MergedModel,
    RunRecord,
    archive_previous_record,
    recorded_afterwards,
    store_stats,
    trainer_eval_metrics,
    unrecorded_checkpoints,
    weights_from_zero_shards,
)
from obim_trainer.training.schedule import MergeSchedule
from obim_trainer.training.selectors import Candidate, Selector, build_selector
from obim_trainer.training.setup import check_select_metric, check_setup, needs_live_stats, prepare_data
from obim_trainer.training.sweep import (
    EVALUATION_TIME,
    CallbackEvaluator,
    PendingMerge,
    keep_pick,
    plan_pending,
    run_pending,
)

__all__ = ["MergedModel", "OBIMCallback", "PendingMerge", "trainer_eval_metrics", "training_untouched"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


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
        self.record = RunRecord()
        """Rank 0's record of the run (candidates, selection, merges); empty on the other ranks."""
        self.schedule = MergeSchedule.of(config)
        self._held: dict[int, tuple[ActivationStats, str]] = {}
        """Rank 0: the selected checkpoints' statistics (and key) as measured at their saves, for the merge."""
        self.latest_merge: Path | None = None
        self._trainer_metrics: dict[int, dict[str, float]] = {}
        self._recorded_steps: set[int] = set()
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
        check_setup(self.config, args)
        self._needs_stats = needs_live_stats(self.config)
        if self.config.consolidate_checkpoints:  # the callback writes the weights that advice is about
            self._advice_hidden.start()
        with deepspeed_deprecations_hidden():
            self._begin(args, state, kwargs.get("model"))

    def _begin(self, args: TrainingArguments, state: TrainerState, model: nn.Module | None) -> None:
        calibration, eval_sets = run_on_main(
            lambda: prepare_data(self.config, self._needs_stats), "preparing OBIM calibration and evaluation data"
        )
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
            run_on_main(lambda: archive_previous_record(self.root), "archiving the OBIM record of an earlier run")

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
        if not self._metric_checked:
            self._metric_checked = check_select_metric(getattr(self.selector, "metric", None), metrics)
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
        """Make the merge rank 0 planned, every rank merging its share of the tensors and evaluating alike
        (see :mod:`~obim_trainer.training.sweep`); then, on rank 0, keep it, log and record. Every rank calls
        this at the same point."""
        made = None
        if pending is not None:
            made = self._guarded(
                lambda: self._merge(pending, timings), f"the OBIM merge at step {step}", everywhere=True
            )
        latest = self._guarded(
            lambda: self._after_merge(step, pending if made else None, made, timings), "recording the merge"
        )
        self.latest_merge = latest if latest is not None else self.latest_merge

    def _merge(self, pending: PendingMerge, timings: dict[str, float]) -> Comparison:
        """Merge, evaluate and pick (collective); ``merge_s`` is the merging, ``merged_evaluation_s`` the rest."""
        trainer = self._trainer()
        trainer = trainer if trainer is not None and eval_datasets(trainer) else None
        evaluator = None
        if trainer is not None or self.evaluator is not None:
            evaluator = CallbackEvaluator(trainer, self.evaluator, timings)
        # saliency is sampled by the merge's preparation on rank 0, which alone logs
        blocks = self.config.saliency_blocks if self.run_logger.enabled and self.config.log_saliency else 0
        evaluated_before = timings.get(EVALUATION_TIME, 0.0)
        start = time.perf_counter()
        known = [self._held.get(c.step) for c in pending.chosen]
        comparison = run_pending(pending, evaluator, self.config, self._device, blocks, known)
        evaluation = timings.get(EVALUATION_TIME, 0.0) - evaluated_before
        timings["merge_s"] = time.perf_counter() - start - evaluation
        return comparison

    # ---- rank 0 ----

    @property
    def candidates(self) -> dict[int, Candidate]:
        return self.record.candidates

    @property
    def selected(self) -> list[int]:
        return self.record.selected

    @property
    def merged(self) -> list[MergedModel]:
        return self.record.merged

    def _after_save(self, candidate: Candidate, stats: ActivationStats | None) -> PendingMerge | None:
        """Record the checkpoint, update the selection and say which merge to make now, if any."""
        step = candidate.step
        candidate.protected = self.guard.protect(candidate.path, step)
        if stats is not None:
            assert self.calibration is not None
            candidate.stats_key = store_stats(stats, candidate, self.calibration)
            self._held[step] = (stats, candidate.stats_key)
        self.record.candidates[step] = candidate
        self.record.saves += 1
        self.run_logger.log_checkpoint(step, candidate.metrics)
        changed = self._select(step)
        return self._pending_merge(step) if self.schedule.due(self.record.saves, changed) else None

    def _after_merge(
        self, step: int, pending: PendingMerge | None, made: Comparison | None, timings: dict[str, float]
    ) -> Path | None:
        """Keep and log a merge just made (if any), log the step's timings and write the record."""
        if pending is not None and made is not None:
            self._complete_merge(pending, made, timings)
        if pending is not None or timings:
            self.run_logger.log_timings(step, timings)
            self.record.write(self.root, self.config.select_metric)
        return self.latest_merge

    def _select(self, step: int) -> bool:
        """Update the selection; protected copies of checkpoints that are not selected are released.

        True when the selected set changed.
        """
        record = self.record
        available = [c for c in record.candidates.values() if c.available]
        chosen = [c.step for c in self.selector.select(available, self.config.top_k)]
        for candidate in record.candidates.values():
            if candidate.step in chosen and candidate.protected is None:
                candidate.protected = self.guard.protect(candidate.path, candidate.step)
            elif candidate.step not in chosen and candidate.protected is not None:
                self.guard.release(candidate.step)
                candidate.protected = None
                self._held.pop(candidate.step, None)
        changed = set(chosen) != set(record.selected)
        record.selected = chosen
        self.run_logger.log_candidates(step, list(record.candidates.values()), self._selected_candidates())
        return changed

    def _selected_candidates(self) -> list[Candidate]:
        return [self.record.candidates[s] for s in self.record.selected]

    def _pending_merge(self, step: int) -> PendingMerge | None:
        """The merge of the selected checkpoints, unless the schedule says they cannot be merged now."""
        if not self.schedule.ready(self.record.selected, self.record.merged):
            return None
        return plan_pending(self.config, self.root, step, self._selected_candidates())

    def _complete_merge(self, pending: PendingMerge, made: Comparison, timings: dict[str, float]) -> None:
        """Keep the merge just made (for a sweep: the pick), and log it with what its engine measured."""
        merged, chosen = pending.merged, pending.chosen
        result = keep_pick(pending, made, self.config.keep_sweep)
        self.record.merged.append(merged)
        self.latest_merge = merged.path
        self._prune_merged()
        self.run_logger.log_merge(merged.step, merged.metrics, chosen)
        if pending.sweep and made.table is not None:
            self.run_logger.log_sweep(merged.step, made.table)
        if self.run_logger.enabled and self.config.log_saliency and result.report is not None:
            with _timed(timings, "summary_s"):
                layers = summarize_report(result.report, result.plan)
                shares = (result.manifest or {}).get("ownership_share")
                self.run_logger.log_merge_summary(merged.step, layers, chosen, shares, bins=self.config.histogram_bins)
        losses = ", ".join(f"{k} {v:.4f}" for k, v in sorted(merged.metrics.items()) if k.endswith("_loss"))
        losses = f" ({losses})" if losses else ""
        logger.info("merged checkpoints %s into %s%s", merged.checkpoints, merged.path, losses)

    def _prune_merged(self) -> None:
        while len(self.record.merged) > self.config.keep_merged:
            old = self.record.merged.pop(0)
            shutil.rmtree(old.path, ignore_errors=True)
            logger.info("deleted %s (keep_merged=%d)", old.path, self.config.keep_merged)

    def _resume(self, global_step: int, output_dir: Path) -> Path | None:
        """Pick up the record of the run being resumed (candidates up to ``global_step``), then record every
        checkpoint the run saved but did not record (it stopped during that save)."""
        self.record = RunRecord.read(self.root, global_step)
        self._record_unrecorded(global_step, output_dir)
        self.latest_merge = self.record.merged[-1].path if self.record.merged else None
        return self.latest_merge

    def _record_unrecorded(self, global_step: int, output_dir: Path) -> None:
        """Record (statistics, evaluation, protected copy) each ``checkpoint-N`` up to ``global_step`` missing
        from the record, before checkpoint rotation can delete it; one that holds only ZeRO shards (the run
        stopped before the callback wrote its weights) gets its weights rebuilt from them first."""
        steps = []
        for step, folder in unrecorded_checkpoints(output_dir, global_step, set(self.record.candidates)):
            if hf_format(folder) is None:
                weights_from_zero_shards(folder, parse_size(self.config.out_shard_size))
            self.record.candidates[step] = recorded_afterwards(
                step, folder, self.guard, self.evaluator, self.calibration, self.config, self._device
            )
            self.record.saves += 1
            steps.append(step)
        if steps:
            self._select(global_step)
            self.record.write(self.root, self.config.select_metric)
            logger.warning(
                "checkpoint(s) at step(s) %s were saved but not recorded by OBIM (the run stopped during the save); "
                "recorded them now from their files and trainer_state.json; selected %s",
                steps,
                self.record.selected,
            )
