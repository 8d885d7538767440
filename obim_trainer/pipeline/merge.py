"""``merge_checkpoints``: one offline merge from folders on disk to a new model folder.

The order of work is chosen so that nothing is lost and mistakes surface early:
configuration and inputs are validated before any statistics are computed, the
output location is checked before any statistics are computed, statistics are cached
(in the user cache, or beside each checkpoint when asked), and the merged folder only appears, complete, at the end.

``merge_sweep`` makes several merges of the same inputs (a comparison's or a sweep's variants) in one
streaming pass: the inputs are opened once and each input tensor is read once for all of them
(:func:`~obim_trainer.pipeline.engine.run_together`); a plain merge is a sweep of one.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from obim_trainer.calibration import (
    ActivationStats,
    CalibrationSet,
    load_or_compute_stats,
    stats_key,
)
from obim_trainer.calibration.activation_stats import warn_unreached_experts
from obim_trainer.calibration.languages import (
    LanguageCalibration,
    check_languages,
    is_per_language,
    load_language_texts,
    missing_calibration,
)
from obim_trainer.calibration.preparation import prepare_language_calibration
from obim_trainer.calibration.stats_cache import StatsOrigin
from obim_trainer.checkpoints import (
    CheckpointReader,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    copy_model_files,
    open_checkpoint,
    parse_size,
)
from obim_trainer.checkpoints.model_files import TOKENIZER_FILES
from obim_trainer.checkpoints.model_loading import load_model
from obim_trainer.checkpoints.safetensors_writer import ShardLayout
from obim_trainer.distributed.ranks import is_main_process, rank, run_on_every_rank, run_on_main, world_size
from obim_trainer.errors import CheckpointError, ConfigError
from obim_trainer.merging import MergeMethod, ParamKind, build_method
from obim_trainer.merging.native_library import kernel_state
from obim_trainer.merging.registry import StatisticsNeeds
from obim_trainer.merging.regmean import RIDGED_NOTE
from obim_trainer.pipeline.engine import (
    EngineReport,
    MergeEngine,
    MergePlan,
    ModelStatistics,
    plan_merge,
    run_together,
    sampled_blocks,
    split_plan,
)
from obim_trainer.pipeline.layout import ModelLayout
from obim_trainer.pipeline.manifest import MergeManifest, describe_input
from obim_trainer.pipeline.sequential_regmean import sequential_regmean, sequential_write_order
from obim_trainer.pipeline.statistics import describe_statistics, model_statistics, raise_nonfinite, warn_stored_fused
from obim_trainer.settings.merge import MergeConfig
from obim_trainer.settings.names import setting_name
from obim_trainer.training.run_dir import best_checkpoint, select_top_checkpoints

logger = logging.getLogger(__name__)


@dataclass
class MergeResult:
    """What :func:`merge_checkpoints` did: the output folder (``None`` for a dry run), plan and record."""

    output: Path | None
    checkpoints: list[Path]
    plan: MergePlan
    manifest: dict[str, Any] | None = None
    plan_text: str | None = None
    report: EngineReport | None = None
    """The engine's measurements of this merge (ownership per tensor, sampled saliency), ``None`` for a dry run."""


def resolve_checkpoints(config: MergeConfig) -> list[Path]:
    """The checkpoint folders to merge: as given, or the top-k of ``run_dir`` by ``metric`` (best first)."""
    if config.checkpoints:
        return list(config.checkpoints)
    assert config.run_dir is not None and config.metric is not None and config.top_k is not None
    chosen = select_top_checkpoints(config.run_dir, config.metric, config.top_k, config.metric_mode)
    return [c.path for c in chosen]


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name} was asked for but CUDA is not available here; set {setting_name('device', 'cpu')}"
        )
    return device


def resolve_tokenizer(config: MergeConfig, checkpoints: list[Path], plan: MergePlan, source: int) -> Path:
    """The folder whose tokenizer the output gets and calibration uses.

    ``tokenizer_source`` if given; else, when the checkpoints extend the vocabulary, checkpoint
    ``source`` (the first or best), whose tokenizer knows the new tokens — the base's would not; else the base.
    """
    if config.tokenizer_source is not None:
        return config.tokenizer_source
    if plan.vocab_size is None:
        return config.base
    folder = checkpoints[source]
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"the checkpoints extend the vocabulary to {plan.vocab_size} tokens, but {folder} holds no tokenizer "
            "files and the base's tokenizer lacks the new tokens; "
            f"set {setting_name('tokenizer_source', 'DIR')} to the tokenizer the run trained with "
            "(Trainer saves it in each checkpoint when given processing_class=tokenizer)"
        )
    logger.info("the checkpoints extend the vocabulary; using the tokenizer of %s", folder)
    return folder


def new_rows_source(config: MergeConfig, checkpoints: list[Path], plan: MergePlan) -> int:
    """Which checkpoint the ``best``/``first`` rules (and the tokenizer of an extended vocabulary) come from."""
    if config.new_rows != "best" or plan.vocab_size is None or config.run_dir is not None:
        return 0  # with --run-dir the checkpoints are already best first
    return best_checkpoint(checkpoints, config.metric, config.metric_mode)


def checkpoint_stats(
    reader: CheckpointReader, calibration: CalibrationSet, config: MergeConfig, device: torch.device
) -> tuple[ActivationStats, dict[str, Any]]:
    """Statistics of one checkpoint, computed on that checkpoint and cached (see ``calibration/stats_cache.py``).

    The model is built from the reader's tensors (see :mod:`~obim_trainer.checkpoints.model_loading`), so
    DeepSpeed and LoRA checkpoints get statistics too, and always of exactly the weights merged.
    """
    fingerprint = reader.fingerprint()
    key = stats_key(calibration.fingerprint(), fingerprint)

    def compute() -> ActivationStats:
        logger.info("computing activation statistics of %s (%s)", reader.path, reader.format)
        model = load_model(reader, config.base, device)
        try:
            return ActivationStats.collect(
                model,
                calibration,
                batch_size=config.calibration_batch_size,
                device=device,
                progress=config.progress,
                desc=f"activation statistics of {reader.path.name}",
            )
        finally:
            del model

    stats, source = load_or_compute_stats(
        reader.path,
        key,
        compute,
        cache_dir=config.stats_cache_dir,
        recompute=config.recompute_stats,
        beside=config.stats_beside_checkpoints,
        origin=StatsOrigin.of(calibration, reader.path, fingerprint),
    )
    if not all(bool(torch.isfinite(t).all()) for t in stats.sq_sum.values()):
        raise_nonfinite(reader)
    return stats, {"kind": "activations", "checkpoint": str(reader.path), "key": key, "source": source}


@dataclass
class _Shared:
    """What the merges of one sweep prepare once for all: the opened inputs (by :func:`_inputs_key`), the model
    layout and the activation statistics of each checkpoint on each calibration set, so that merges of the
    same inputs also hold the same layout and statistics (the engine then lets methods that can merge a tensor
    together do so, see ``engine._same_tasks``)."""

    inputs: dict[InputsKey, Inputs] = field(default_factory=dict)
    layouts: dict[Path, ModelLayout] = field(default_factory=dict)
    activations: dict[tuple[int, str, str, int], tuple[ActivationStats, dict[str, Any]]] = field(default_factory=dict)

    def layout(self, base: Path) -> ModelLayout:
        """The model layout of the base folder ``base``, read once."""
        if base not in self.layouts:
            self.layouts[base] = ModelLayout.from_pretrained_dir(base)
        return self.layouts[base]

    def activation_stats(
        self,
        reader: CheckpointReader,
        calibration: CalibrationSet,
        config: MergeConfig,
        device: torch.device,
        held: tuple[ActivationStats, str] | None,
    ) -> tuple[ActivationStats, dict[str, Any]]:
        """The statistics the caller holds when they are of exactly these texts and weights (same key as
        :func:`checkpoint_stats` computes), else :func:`checkpoint_stats` (cached or computed); once per
        reader, calibration set, device and batch size."""
        key = (id(reader), calibration.fingerprint(), str(device), config.calibration_batch_size)
        if key not in self.activations:
            if held is None or held[1] != stats_key(calibration.fingerprint(), reader.fingerprint()):
                self.activations[key] = checkpoint_stats(reader, calibration, config, device)
            else:
                source = {"kind": "activations", "checkpoint": str(reader.path), "key": held[1], "source": "memory"}
                self.activations[key] = held[0], source
        return self.activations[key]


KnownStats = Sequence[tuple[ActivationStats, str] | None]
"""Per checkpoint, activation statistics the caller already holds and their key (see :func:`stats_key`), or
``None``: the callback's, measured on the live model at the save, so the merge needs no reload."""

Inputs = tuple[CheckpointReader, list[CheckpointReader]]
"""The opened base and checkpoint readers of a merge."""
InputsKey = tuple[Path, tuple[Path, ...], bool]


def _inputs_key(config: MergeConfig, checkpoints: Sequence[Path]) -> InputsKey:
    """What decides the inputs a merge reads: merges with one key can share the opened readers."""
    return Path(config.base), tuple(checkpoints), bool(config.zero_weights)


def _open_inputs(stack: ExitStack, config: MergeConfig, checkpoints: list[Path]) -> Inputs:
    """The base and checkpoint readers, each in its own format; LoRA adapters are read against the base."""
    base = stack.enter_context(open_checkpoint(config.base, zero_weights=config.zero_weights))
    readers = [
        stack.enter_context(open_checkpoint(p, zero_weights=config.zero_weights, base=base)) for p in checkpoints
    ]
    return base, readers


def _shared_inputs(stack: ExitStack, config: MergeConfig, checkpoints: list[Path], shared: _Shared) -> Inputs:
    """The readers of ``config``'s inputs: those another merge of the sweep opened already, or opened now."""
    key = _inputs_key(config, checkpoints)
    if key not in shared.inputs:
        shared.inputs[key] = _open_inputs(stack, config, checkpoints)
    return shared.inputs[key]


def _write_config(folder: Path, plan: MergePlan) -> None:
    """Record the output dtype in config.json so ``dtype="auto"`` loads it as written, and the vocabulary
    size of an extended vocabulary so that the model is built with the rows it stores."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    dtypes = {t.dtype for t in plan.tensors if t.dtype.is_floating_point}
    if len(dtypes) == 1:
        name = str(dtypes.pop()).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = name
    if plan.vocab_size is not None:
        text_config = config.get("text_config")
        target = text_config if isinstance(text_config, dict) and "vocab_size" in text_config else config
        target["vocab_size"] = plan.vocab_size
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def tensor_statistics(kind: ParamKind, needs: StatisticsNeeds) -> str:
    """The dry run's statistics column: what the method reads for a tensor of this kind (``none``: scored
    without calibration data, e.g. at random by OBM saliency)."""
    linear = kind is ParamKind.LINEAR
    read = [
        name
        for name, wanted in (
            ("x²", linear and needs.activations),
            ("Gram", linear and needs.grams),
            ("inputs", linear and needs.sequential),
            ("Fisher", needs.fishers),
        )
        if wanted
    ]
    return "+".join(read) or "none"


def format_plan(
    plan: MergePlan,
    method: MergeMethod,
    checkpoints: list[Path],
    new_rows: str = "obim",
    statistics: Sequence[str] = (),
) -> str:
    """The dry-run plan: method and parameters, the statistics it would measure, checkpoints in order, then
    every tensor."""
    lines = [f"method: {json.dumps(method.describe())}", *statistics]
    lines += [f"checkpoint {k}: {path}" for k, path in enumerate(checkpoints)]
    if plan.vocab_size is not None:
        lines.append(f"vocabulary: the checkpoints extend it to {plan.vocab_size} rows; new rows: {new_rows}")
    if plan.dropped_tied:
        lines.append(f"tied: {plan.dropped_tied} is written once, as the input embedding")
    needs = method.statistics()
    lines.append(f"{'tensor':<56} {'shape':<16} {'dtype':<9} {'kind':<9} {'statistics':<10} {'block':<5} how")
    for t in plan.tensors:
        block = "-" if t.block_index is None else str(t.block_index)
        read = tensor_statistics(t.kind, needs)
        lines.append(
            f"{t.name:<56} {'x'.join(map(str, t.shape)):<16} {str(t.dtype).removeprefix('torch.'):<9} "
            f"{t.kind.value:<9} {read:<10} {block:<5} {method.describe_tensor(t.block_index)}"
        )
    lines.append(f"{len(plan.tensors)} tensors, {plan.num_parameters:,} parameters")
    return "\n".join(lines)


@dataclass
class MergeJob:
    """What a worker needs to merge its share of the tensors into the output folder.

    Picklable, so that a worker process or a rank of a distributed run receives it whole; the
    readers are opened by each worker (file handles do not travel).
    """

    config: MergeConfig
    checkpoints: list[Path]
    layout: ModelLayout
    plan: MergePlan
    method: MergeMethod
    """Built once by the leader (it pickles whole with the job)."""
    shards: ShardLayout
    """The output's shard files and every tensor's place in them, computed once for every worker."""
    stats: list[ActivationStats] | None
    new_rows_source: int
    statistics: ModelStatistics = field(default_factory=ModelStatistics)
    sequential: tuple[CalibrationSet, CalibrationSet] | None = None
    """For a model-level merge (:attr:`StatisticsNeeds.sequential`): the base's and the checkpoints' texts."""
    saliency_blocks: list[int] = field(default_factory=list)
    """Decoder blocks whose saliency the engine samples into its report (:attr:`EngineReport.log_saliency`)."""

    @property
    def folder(self) -> Path:
        """The output's temporary folder (published by the leader's atomic output folder)."""
        return self.shards.folder

    def writer(self, part: Sequence[str]) -> ShardedSafetensorsWriter:
        """A writer of ``part`` of the plan into the output's shard layout. No fsync of its own: the atomic
        output folder fsyncs every file once before publishing it."""
        return ShardedSafetensorsWriter.on_layout(self.shards, part=part, fsync=False)

    def engine(self, inputs: Inputs) -> MergeEngine:
        """The streaming engine of this merge over the opened ``inputs`` (shared by the jobs of a sweep)."""
        base, readers = inputs
        config = self.config
        return MergeEngine(
            base,
            readers,
            self.method,
            self.layout,
            self.stats,
            statistics=self.statistics,
            device=resolve_device(config.device),
            seed=config.seed,
            new_rows=config.new_rows,
            new_rows_source=self.new_rows_source,
            saliency_blocks=self.saliency_blocks,
        )


def merge_parts(
    jobs: Sequence[MergeJob], part: int, parts: int, *, progress: bool = True, inputs: Inputs | None = None
) -> list[EngineReport]:
    """Merge run ``part`` of the plan split in ``parts`` (see :func:`~obim_trainer.pipeline.engine.split_plan`)
    for every job; one report per job.

    Every worker of a parallel merge or sweep, and the single one of a plain merge, runs this: it
    opens the inputs (``inputs``: the leader's, already open), reads each of its tensors once,
    merges it with every job's method (:func:`~obim_trainer.pipeline.engine.run_together`) and
    writes the results at their places in each job's shards. The jobs read the same inputs and
    plan the same tensors; a model-level merge (sequential RegMean) runs whole in part 0.
    """
    reports: dict[int, EngineReport] = {}
    with ExitStack() as stack:
        opened = inputs or _open_inputs(stack, jobs[0].config, jobs[0].checkpoints)
        streamed = [i for i, job in enumerate(jobs) if job.sequential is None]
        for i, job in enumerate(jobs):
            if job.sequential is not None:
                reports[i] = merge_sequential(job, opened, progress=progress) if part == 0 else EngineReport()
        if streamed:
            tensors = split_plan(jobs[streamed[0]].plan.tensors, parts)[part]
            names = [t.name for t in tensors]
            writers = [stack.enter_context(jobs[i].writer(names)) for i in streamed]
            engines = [jobs[i].engine(opened) for i in streamed]
            writes = [w.write for w in writers]
            done = run_together(engines, tensors, writes, progress=progress, recycle_written=True)  # writes keep none
            reports.update(zip(streamed, done, strict=True))
    return [reports[i] for i in range(len(jobs))]


def merge_sequential(job: MergeJob, inputs: Inputs, *, progress: bool = True) -> EngineReport:
    """The whole model-level merge (sequential RegMean) in this process: it runs the model block by block,
    so it is not split between workers or ranks (the others have nothing to do)."""
    config = job.config
    params = job.method.params
    old, new = job.sequential or (None, None)
    assert old is not None and new is not None
    base, readers = inputs
    with job.writer([t.name for t in job.plan.tensors]) as writer:
        report = sequential_regmean(
            base,
            readers,
            config.base,
            old,
            new,
            job.plan,
            writer.write,
            base_weight=params.base_weight,  # type: ignore[attr-defined]
            alpha=params.alpha,  # type: ignore[attr-defined]
            device=resolve_device(config.device),
            batch_size=config.calibration_batch_size,
            progress=progress,
        )
    return EngineReport(seconds=report.seconds, notes={RIDGED_NOTE: report.ridge_count})


def _worker_ready() -> None:
    """Nothing: unpickling it makes a fresh worker import this module (torch and all) before the work arrives."""


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """``workers`` processes for a parallel merge (``None`` for one: the merge runs here), each with its
    share of the CPU threads.

    Opened before the leader validates and loads statistics, so that the workers start and import
    torch meanwhile. They are spawned, not forked: a fork copies torch's thread pool in an
    unusable state.
    """
    if workers == 1:
        yield None
        return
    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)
    ) as pool:
        for _ in range(workers):
            pool.submit(_worker_ready)
        yield pool


def run_parts(
    jobs: Sequence[MergeJob], pool: ProcessPoolExecutor | None, workers: int, *, progress: bool, inputs: Inputs
) -> list[list[EngineReport]]:
    """Merge the jobs' plan, split in ``workers`` runs, in the pool's processes (here, without a pool, through
    the leader's open ``inputs``); per job, one report per run.

    A failure in any worker is raised here once every worker has stopped.
    """
    if pool is None:
        return [[report] for report in merge_parts(jobs, 0, 1, progress=progress, inputs=inputs)]
    futures = [pool.submit(merge_parts, jobs, i, workers, progress=progress and i == 0) for i in range(workers)]
    wait(futures)  # no worker may still be writing when a failure discards the output folder
    per_worker = [future.result() for future in futures]
    return [list(reports) for reports in zip(*per_worker, strict=True)]


@dataclass
class _Prepared:
    """The leader's side of a merge between validation and the finished folder."""

    config: MergeConfig
    job: MergeJob
    base: CheckpointReader
    readers: list[CheckpointReader]
    tokenizer_dir: Path
    calibration: LanguageCalibration | None
    stats_sources: list[dict[str, Any]]
    timings: dict[str, float]
    start: float


def _prepare(
    stack: ExitStack,
    config: MergeConfig,
    shared: _Shared,
    saliency_blocks: int = 0,
    known_stats: KnownStats | None = None,
) -> _Prepared | MergeResult:
    """Validate everything, compute (or load) statistics and open the temporary output folder.

    Returns a :class:`MergeResult` for a dry run. The readers and the output folder live in ``stack``;
    the readers and statistics are taken from ``shared`` when another merge of the sweep has them already.
    ``saliency_blocks``: how many evenly spaced decoder blocks the engine samples saliency on for its report.
    ``known_stats``: statistics the caller holds, used where their key is that of this merge's texts and weights.
    """
    start = time.perf_counter()
    timings: dict[str, float] = {}
    device = resolve_device(config.device)
    checkpoints = resolve_checkpoints(config)
    method = build_method(config.method, config.params, num_models=len(checkpoints))
    needs = method.statistics()
    check_languages(config.calibration_data, config.new_languages, needs, method.name)
    parse_size(config.out_shard_size)  # a bad size fails now, not after the statistics
    if not config.base.is_dir():
        raise CheckpointError(
            f"base folder {config.base} does not exist; set {setting_name('base', 'DIR')} to the base model's folder"
        )
    texts = None
    if needs.any and config.calibration_data is not None:  # every file read (an empty one refused) before any input
        texts = load_language_texts(config.calibration_data, config.calibration_samples, config.calibration_text_field)
    base, readers = _shared_inputs(stack, config, checkpoints, shared)
    layout = shared.layout(config.base)
    plan = plan_merge(base, readers, layout, config.dtype)
    warn_stored_fused(plan, needs)
    source = new_rows_source(config, checkpoints, plan)
    tokenizer_dir = resolve_tokenizer(config, checkpoints, plan, source)
    if needs.any and texts is None:
        raise missing_calibration(method.name, needs)
    if needs.sequential and plan.vocab_size is not None:
        raise ConfigError(
            f"the checkpoints extend the vocabulary to {plan.vocab_size} rows, which the layer-by-layer merge of "
            f"'{method.name}' cannot run: set the method's parameter sequential: false "
            f"({setting_name('params', {'sequential': False})})"
        )
    calibration = prepare_language_calibration(config, config.base, tokenizer_dir, texts) if texts is not None else None
    if config.dry_run:
        text = format_plan(plan, method, checkpoints, config.new_rows, describe_statistics(needs, calibration))
        logger.info("dry run, nothing written:\n%s", text)
        return MergeResult(output=None, checkpoints=checkpoints, plan=plan, plan_text=text)
    assert config.output is not None
    inputs = [config.base, *checkpoints, tokenizer_dir]
    folder = stack.enter_context(atomic_output_dir(config.output, overwrite=config.overwrite, inputs=inputs))
    stats, statistics, stats_sources = None, ModelStatistics(), []
    sequential = None
    if needs.sequential and calibration is not None:
        plan = sequential_write_order(plan, layout)
        sequential = (calibration.side("base", needs.per_language), calibration.side("checkpoints", needs.per_language))
    elif calibration is not None:
        t0 = time.perf_counter()
        stats, statistics, stats_sources = _measure(
            config, needs, calibration, texts, base, readers, plan, device, shared, known_stats
        )
        timings["statistics_s"] = time.perf_counter() - t0
    metadata = {"format": "pt", "merged_by": "obim-trainer", "method": method.name}
    blocks = {t.block_index for t in plan.tensors if t.block_index is not None}
    job = MergeJob(
        config=config.model_copy(update={"calibration_data": None}),  # read already; may not pickle
        checkpoints=checkpoints,
        layout=layout,
        plan=plan,
        method=method,
        shards=ShardLayout.build(folder, plan.write_plan(), parse_size(config.out_shard_size), metadata),
        stats=stats,
        new_rows_source=source,
        statistics=statistics,
        sequential=sequential,
        saliency_blocks=sampled_blocks(blocks, saliency_blocks),
    )
    return _Prepared(config, job, base, readers, tokenizer_dir, calibration, stats_sources, timings, start)


def _measure(
    config: MergeConfig,
    needs: StatisticsNeeds,
    calibration: LanguageCalibration,
    texts: dict[str, list[str]] | None,
    base: CheckpointReader,
    readers: list[CheckpointReader],
    plan: MergePlan,
    device: torch.device,
    shared: _Shared,
    known_stats: KnownStats | None = None,
) -> tuple[list[ActivationStats] | None, ModelStatistics, list[dict[str, Any]]]:
    """The statistics ``needs`` asks for (cached or computed) and their records: activations of each checkpoint
    on all the texts, Grams and Fisher diagonals of the base and of each checkpoint on their sides' texts."""
    stats, records = None, []
    if needs.activations:
        everything = calibration.all()
        known = list(known_stats or [None] * len(readers))
        pairs = [
            shared.activation_stats(r, everything, config, device, held) for r, held in zip(readers, known, strict=True)
        ]
        stats = [s for s, _ in pairs]
        warn_unreached_experts([s.count for s in stats])
        records = [{**src, "model": "checkpoint", "languages": list(calibration.sets)} for _, src in pairs]
    base_calibration = None
    if (needs.grams or needs.fishers) and plan.vocab_size is not None:
        base_calibration = prepare_language_calibration(config, config.base, config.base, texts)  # the base's ids
    statistics, measured = model_statistics(base, readers, needs, calibration, config, device, base_calibration)
    return stats, statistics, records + measured


def _kernels(device: torch.device) -> dict[str, str]:
    """What merged: the native loops (on the CPU, when they loaded) or torch, with the reason."""
    if device.type != "cpu":
        return {"path": "torch", "origin": "none", "reason": f"merging on {device}"}
    return kernel_state().to_dict()


def _finish(prepared: _Prepared, reports: Sequence[EngineReport]) -> MergeResult:
    """Index, config, tokenizer and manifest into the output folder, once every part is written."""
    config, job, timings = prepared.config, prepared.job, prepared.timings
    files = job.shards.write_index(fsync=False)  # the atomic output folder fsyncs every file once
    report = EngineReport.combined(reports)
    timings["merge_s"] = report.seconds
    folder, plan, tokenizer_dir = job.folder, job.plan, prepared.tokenizer_dir
    copy_model_files(config.base, tokenizer_dir if tokenizer_dir != config.base else None, folder)
    _write_config(folder, plan)
    timings["total_s"] = time.perf_counter() - prepared.start
    assert config.output is not None
    manifest = MergeManifest(
        method=job.method.describe(),
        seed=config.seed,
        base=describe_input(prepared.base),
        checkpoints=[describe_input(r) for r in prepared.readers],
        output={
            "path": str(config.output.resolve()),
            "files": [f.name for f in files],
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in plan.tensors}),
            "num_tensors": len(plan.tensors),
            "num_parameters": plan.num_parameters,
            "tokenizer": str(Path(tokenizer_dir).resolve()),
            "vocab_size": plan.vocab_size,
            "new_rows": config.new_rows if plan.vocab_size is not None else None,
            "workers": len(reports),
        },
        calibration=_describe_calibration(config, prepared.calibration, job.method.statistics()),
        statistics=prepared.stats_sources,
        ownership_share=report.ownership_share(len(prepared.readers)) if report.owned else None,
        base_share=report.base_share(plan) if report.owned else None,
        notes=report.notes,
        timings=timings,
        kernels=_kernels(resolve_device(config.device)),
    ).write(folder)
    return MergeResult(output=config.output, checkpoints=job.checkpoints, plan=plan, manifest=manifest, report=report)


def _build_config(config: MergeConfig | None, kwargs: dict[str, Any]) -> MergeConfig:
    if config is None:
        return MergeConfig.build(kwargs)
    return MergeConfig.build({**config.model_dump(), **kwargs}) if kwargs else config


def merge_checkpoints(config: MergeConfig | None = None, /, **kwargs: Any) -> MergeResult:
    """Merge checkpoints into their base and write a Hugging Face model folder.

    Call with a :class:`MergeConfig` or with its fields as keyword arguments::

        merge_checkpoints(base="qwen2-7b", checkpoints=["run/checkpoint-3000", "run/checkpoint-4000"],
                          calibration_data="calib.jsonl", output="merged")

    With ``workers=N`` the tensors are split between N processes, each writing its share into
    the same shard files; the output is byte for byte the one-process output. Returns a
    :class:`MergeResult`. Every user-fixable problem raises an
    :class:`~obim_trainer.errors.OBIMError` before any output exists.
    """
    return merge_sweep([_build_config(config, kwargs)])[0]


T = TypeVar("T")


def _by_group(jobs: Sequence[MergeJob], run: Callable[[list[MergeJob], int], list[T]]) -> dict[int, T]:
    """``run`` once per group of jobs that stream together (same inputs, same planned tensors: a sweep's
    variants), given the group and its first job's index; each job's result by its index."""
    groups: dict[tuple[InputsKey, tuple[Any, ...]], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((_inputs_key(job.config, job.checkpoints), tuple(job.plan.tensors)), []).append(i)
    results: dict[int, T] = {}
    for group in groups.values():
        results.update(zip(group, run([jobs[i] for i in group], group[0]), strict=True))
    return results


def _prepare_all(
    stack: ExitStack, configs: Sequence[MergeConfig], saliency_blocks: int = 0, known_stats: KnownStats | None = None
) -> list[_Prepared | MergeResult]:
    """Every merge validated and prepared in order, the inputs each distinct set of folders needs opened once."""
    shared = _Shared()
    return [_prepare(stack, config, shared, saliency_blocks, known_stats) for config in configs]


def merge_sweep(configs: Sequence[MergeConfig]) -> list[MergeResult]:
    """Several merges (one per configuration, e.g. a sweep's variants), each into its own folder, as
    :func:`merge_checkpoints` would make them one by one, byte for byte.

    Merges of the same inputs share one streaming pass: the inputs are opened once and each input
    tensor is read once and merged by every method (model-level merges, sequential RegMean, run
    whole on their own). All folders appear at the end, together; a failure leaves none. The
    workers (``workers`` of the first configuration) each merge their run of tensors for all.
    """
    configs = list(configs)
    if not configs:
        return []
    with ExitStack() as stack:
        pool = stack.enter_context(worker_pool(1 if configs[0].dry_run else configs[0].workers))
        prepared = _prepare_all(stack, configs)
        merges = [p for p in prepared if isinstance(p, _Prepared)]
        workers, progress = configs[0].workers, configs[0].progress

        def merge(jobs: list[MergeJob], first: int) -> list[list[EngineReport]]:
            inputs = (merges[first].base, merges[first].readers)
            return run_parts(jobs, pool, workers, progress=progress, inputs=inputs)

        reports = _by_group([p.job for p in merges], merge)
        finished = iter([_finish(p, reports[i]) for i, p in enumerate(merges)])
        results = [p if isinstance(p, MergeResult) else next(finished) for p in prepared]
    for result in results:
        if result.output is not None:
            logger.info(
                "merged %d checkpoints into %s in %.1f s", len(result.checkpoints), result.output, _total(result)
            )
    return results


def merge_checkpoints_on_ranks(
    config: MergeConfig, *, saliency_blocks: int = 0, known_stats: KnownStats | None = None
) -> MergeResult:
    """:func:`merge_checkpoints` with the work split between the ranks of the running process group.

    Every rank calls it at the same point with the same configuration. Rank 0 validates, loads
    the statistics and opens the output folder; each rank merges its run of tensors
    (:func:`merge_parts`) into the shared shards; after all are done rank 0 writes the index,
    config and manifest and publishes the folder. A failure anywhere is raised on every rank,
    and the folder then never appears. Outside a process group this is :func:`merge_checkpoints`.
    ``saliency_blocks`` and ``known_stats``: see :func:`merge_sweep_on_ranks`.
    """
    return merge_sweep_on_ranks([config], saliency_blocks=saliency_blocks, known_stats=known_stats)[0]


def merge_sweep_on_ranks(
    configs: Sequence[MergeConfig], *, saliency_blocks: int = 0, known_stats: KnownStats | None = None
) -> list[MergeResult]:
    """:func:`merge_sweep` with the work split between the ranks of the running process group (collective,
    as :func:`merge_checkpoints_on_ranks`): each rank reads its run of tensors once for every merge.

    ``saliency_blocks``: decoder blocks sampled for the saliency in each ``result.report`` (the callback logs
    it); ``known_stats``: rank 0's statistics of the checkpoints already in memory (see :data:`KnownStats`).
    """
    configs = list(configs)
    if not configs:
        return []
    prepared: list[_Prepared | MergeResult] = []
    with ExitStack() as stack:

        def prepare() -> list[MergeJob | MergeResult]:
            prepared.extend(_prepare_all(stack, configs, saliency_blocks, known_stats))
            return [p if isinstance(p, MergeResult) else p.job for p in prepared]

        shared = run_on_main(prepare, "preparing the merge")
        jobs = [job for job in shared if isinstance(job, MergeJob)]
        show = configs[0].progress and is_main_process()
        leader = [p for p in prepared if isinstance(p, _Prepared)]  # rank 0's open readers; empty elsewhere

        def merge(group: list[MergeJob], first: int) -> list[EngineReport]:
            inputs = (leader[first].base, leader[first].readers) if leader else None
            return merge_parts(group, rank(), world_size(), progress=show, inputs=inputs)

        def merge_all() -> dict[int, EngineReport]:
            return _by_group(jobs, merge)

        per_rank = run_on_every_rank(merge_all, "merging")

        def finish() -> list[MergeResult]:
            merges = [p for p in prepared if isinstance(p, _Prepared)]
            finished = iter([_finish(p, [reports[i] for reports in per_rank]) for i, p in enumerate(merges)])
            results = [p if isinstance(p, MergeResult) else next(finished) for p in prepared]
            stack.close()  # publishes the folders; a failure here reaches every rank too
            return results

        results = run_on_main(finish, "finishing the merge")
    if is_main_process():
        for result in results:
            if result.output is not None:
                logger.info(
                    "merged %d checkpoints into %s in %.1f s", len(result.checkpoints), result.output, _total(result)
                )
    return results


def _total(result: MergeResult) -> float:
    return float((result.manifest or {}).get("timings", {}).get("total_s", 0.0))


def _describe_set(calibration: CalibrationSet) -> dict[str, Any]:
    return {
        "samples": len(calibration.input_ids),
        "tokens": calibration.num_tokens,
        "fingerprint": calibration.fingerprint(),
    }


def _describe_calibration(
    config: MergeConfig, calibration: LanguageCalibration | None, needs: StatisticsNeeds
) -> dict[str, Any] | None:
    """The calibration texts, per language when given so, and which texts each model was measured on."""
    if calibration is None:
        return None
    source = config.calibration_data
    record: dict[str, Any] = {
        "source": str(source) if isinstance(source, (str, Path)) else type(source).__name__,
        **_describe_set(calibration.all()),
        "max_length": config.calibration_max_length,
    }
    if is_per_language(source):
        record["source"] = {language: str(path) for language, path in source.items()}
        record["languages"] = {
            language: {**_describe_set(texts), "new": language in calibration.new_languages}
            for language, texts in calibration.sets.items()
        }
        record["new_languages"] = list(calibration.new_languages)
    measured = {"checkpoints": calibration.languages_of("checkpoints", needs.per_language)}
    if needs.grams or needs.fishers or needs.sequential:
        measured["base"] = calibration.languages_of("base", needs.per_language)
    record["measured_on"] = measured
    return record
