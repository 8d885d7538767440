"""The streaming merge engine: one tensor name at a time, from the readers through a method into the writer.

The engine validates that the base and the K checkpoints describe the same model
(names, shapes), decides each tensor's output dtype, and then, per tensor, reads the
base and the checkpoints, checks every input for NaN/Inf, hands them to the method and
writes the result. Reading the next tensor, merging this one and writing the previous one
overlap (a reading thread, this one, a writing thread per output; reads, writes, torch's kernels and
the native loops all release the GIL), so a merge runs at about the speed of the slower of the
disk and the math. It knows block indices (for the merge order) and nothing else about the method;
memory is a few tensors, never the model.

Device: inputs are read on the CPU and moved to ``device`` (``cpu`` or ``cuda[:N]``) for the
math, and each result comes back to the CPU to be written; only the current tensor's inputs,
its result and the method's scratch buffers live on the device.

Parallel merges split the plan with :func:`split_plan`: each worker (a process, or a rank of
a distributed run) merges a contiguous run of tensors into the shared output layout.

Sweeps: V merges of the same inputs (methods side by side, OBIM at several total shares) run
together (:func:`run_together`): each input tensor is read and checked once, and every merge
reads it in place; only a checkpoint tensor a method takes over to write into (iterative merging's
first checkpoint, a float32 one a method computes in) is copied, into a recycled buffer, for every
merge but the last, so V merges read the inputs once instead of V times.

Extended vocabularies: continued pre-training for a new language often adds tokens
(``resize_token_embeddings``), so the checkpoints' embedding and lm_head have more rows than
the base's. The rows the base has are merged exactly as without the extension (same task,
same counts, same seeds), and the new rows, which have no base value, by the ``new_rows``
rule (see :data:`NEW_ROWS`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy
import torch
from torch import Tensor
from tqdm.auto import tqdm

from obim_trainer.calibration import ActivationStats
from obim_trainer.calibration.fisher_stats import FisherStats
from obim_trainer.calibration.gram_stats import GramStats
from obim_trainer.checkpoints import CheckpointReader, TensorInfo
from obim_trainer.checkpoints.read_buffers import ReadBuffers
from obim_trainer.errors import CheckpointError, ConfigError
from obim_trainer.merging import MergeMethod, ParamKind, TensorTask, Workspace
from obim_trainer.merging.task import MergeOutput, derive_seed
from obim_trainer.pipeline.input_check import check_finite
from obim_trainer.pipeline.layout import ModelLayout, block_index
from obim_trainer.settings.names import setting_name

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LIST_LIMIT = 5
NEW_ROWS = {
    "obim": "the merge method itself on the new rows, with the base taken as zero there (for OBIM: each "
    "checkpoint owns its share of the positions by saliency, its values taken whole)",
    "best": "the new rows of the best checkpoint (by metric)",
    "first": "the new rows of the first checkpoint in the given order",
    "average": "the mean of the checkpoints' new rows",
}


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to merge: where it sits in the network and how it is written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: ParamKind
    block_index: int | None
    base_rows: int | None = None
    """For a vocabulary tensor the checkpoints extend: the rows the base has (``shape[0]`` is more)."""


@dataclass
class MergePlan:
    """The validated list of tensors to merge, in write order."""

    tensors: list[TensorPlan]
    dropped_tied: str | None = None
    vocab_size: int | None = None
    """The checkpoints' vocabulary size when they extend the base's, else ``None``."""

    @property
    def num_parameters(self) -> int:
        return sum(torch.Size(t.shape).numel() for t in self.tensors)

    def write_plan(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(t.name, t.shape, t.dtype) for t in self.tensors]


SALIENCY_SAMPLE = 1 << 16
"""At most this many log-saliency values per tensor and checkpoint in a report (a seeded sample beyond)."""


def sampled_blocks(block_indices: set[int], count: int) -> list[int]:
    """``count`` evenly spaced decoder blocks, first and last included (the blocks a report samples saliency on)."""
    ordered = sorted(block_indices)
    if len(ordered) <= count:
        return ordered
    if count == 1:
        return [ordered[len(ordered) // 2]]
    return sorted({ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)})


@dataclass
class EngineReport:
    """What the streaming pass measured: ownership per tensor, saliency on sampled blocks and time spent.

    This is what W&B logs about a merge (:mod:`~obim_trainer.tracking.merge_summary`): the numbers of the
    merge that was written, not of a second one. Its size is bounded: K counts per tensor, and at most
    :data:`SALIENCY_SAMPLE` values per checkpoint for the tensors of the sampled blocks.
    """

    owned: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0
    notes: dict[str, int] = field(default_factory=dict)
    """Counts a method reports per tensor (:attr:`MergeOutput.notes`), summed over the tensors."""
    log_saliency: dict[str, list[Tensor]] = field(default_factory=dict)
    """Per Linear weight of a sampled block, per checkpoint: log10 of its positive OBM saliencies
    s_ij = mean_j(x²)·δ_ij² (eq. 5), as measured on the merge's own inputs and statistics."""

    @classmethod
    def combined(cls, reports: Sequence[EngineReport]) -> EngineReport:
        """One report for a merge split between workers: every tensor's ownership and saliency, the slowest
        worker's time, the notes summed."""
        owned = {name: counts for report in reports for name, counts in report.owned.items()}
        saliency = {name: values for report in reports for name, values in report.log_saliency.items()}
        notes: Counter[str] = Counter()
        for report in reports:
            notes.update(report.notes)
        seconds = max((r.seconds for r in reports), default=0.0)
        return cls(owned=owned, seconds=seconds, notes=dict(notes), log_saliency=saliency)

    def base_share(self, plan: MergePlan) -> float:
        """Share of the owned tensors' positions no checkpoint took (the base keeps them: Σ n_k < 1)."""
        positions = sum(torch.Size(t.shape).numel() for t in plan.tensors if t.name in self.owned)
        taken = sum(sum(counts) for counts in self.owned.values())
        return max(0.0, 1.0 - taken / positions) if positions else 0.0

    def ownership_share(self, num_models: int) -> list[float]:
        """Share of all merged positions taken from each checkpoint (methods that report ownership)."""
        totals = [0] * num_models
        for counts in self.owned.values():
            for k, c in enumerate(counts):
                totals[k] += c
        grand = sum(totals)
        return [t / grand if grand else 0.0 for t in totals]


def _short_list(names: Sequence[str]) -> str:
    shown = ", ".join(sorted(names)[:_LIST_LIMIT])
    return shown + (f" and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else "")


def _check_same_names(base: CheckpointReader, ckpt: CheckpointReader, ignore: set[str]) -> None:
    base_names = set(base.tensor_infos()) - ignore
    ckpt_names = set(ckpt.tensor_infos()) - ignore
    extra, missing = ckpt_names - base_names, base_names - ckpt_names
    if extra:
        raise CheckpointError(
            f"checkpoint {ckpt.path} has tensor(s) the base {base.path} lacks: {_short_list(list(extra))}. "
            "Merge only checkpoints trained from this base (same architecture and layer names)."
        )
    if missing:
        raise CheckpointError(
            f"checkpoint {ckpt.path} lacks tensor(s) the base {base.path} has: {_short_list(list(missing))}. "
            "The checkpoint is incomplete or of another architecture; re-save it with save_pretrained."
        )


def _check_shape(name: str, base: TensorInfo, other: TensorInfo) -> None:
    if base.shape != other.shape:
        raise CheckpointError(
            f"tensor {name} has shape {tuple(base.shape)} in the base ({base.file}) but {tuple(other.shape)} in "
            f"{other.file}. Checkpoints must have the base's architecture."
        )


def _extended_rows(name: str, base: TensorInfo, others: Sequence[TensorInfo]) -> int | None:
    """The checkpoints' row count of a vocabulary tensor they extend, ``None`` when they keep the base's.

    Raises :class:`CheckpointError` when the checkpoints disagree on the vocabulary or have fewer rows.
    """
    for info in others:
        if info.shape[1:] != base.shape[1:]:
            _check_shape(name, base, info)
    rows = {info.shape[0] for info in others}
    if len(rows) > 1:
        found = ", ".join(f"{info.file}: {info.shape[0]}" for info in others)
        raise CheckpointError(
            f"tensor {name}: the checkpoints have different vocabulary sizes ({found} rows). They were trained "
            "with different tokenizers; merge only checkpoints that share one vocabulary (of the same run)."
        )
    (count,) = rows
    if count == base.shape[0]:
        return None
    if count < base.shape[0]:
        raise CheckpointError(
            f"tensor {name}: the checkpoints ({others[0].file}) have {count} vocabulary rows but the base "
            f"({base.file}) has {base.shape[0]}. A shrunk vocabulary cannot be merged into the base; pass the base "
            "the checkpoints were trained from."
        )
    return count


def _output_dtype(base: TensorInfo, requested: str) -> torch.dtype:
    """The requested dtype, or with ``auto`` the base's: checkpoints may differ (fp32 ZeRO masters, a bf16
    run of an fp32 base), the base is the one model every input shares. Integer buffers keep theirs."""
    if requested == "auto" or not base.dtype.is_floating_point:
        return base.dtype
    return DTYPES[requested]


def plan_merge(
    base: CheckpointReader,
    checkpoints: Sequence[CheckpointReader],
    layout: ModelLayout,
    dtype: str = "auto",
) -> MergePlan:
    """Validate that all inputs describe the same model and list the tensors to merge.

    Vocabulary tensors (embedding, lm_head) may have more rows in the checkpoints than in the base, if
    all checkpoints have the same number. Raises :class:`CheckpointError` on missing/extra tensors and
    shape mismatches; each names the file and tensor.
    """
    if not checkpoints:
        raise ConfigError("no checkpoints to merge (K = 0); give at least one checkpoint folder")
    all_names = set(base.tensor_infos()).union(*(set(c.tensor_infos()) for c in checkpoints))
    dropped = layout.redundant_tied_name(all_names)
    ignore = {dropped} if dropped else set()
    for ckpt in checkpoints:
        _check_same_names(base, ckpt, ignore)
    tensors, vocab_size = [], None
    for name, info in base.tensor_infos().items():
        if name in ignore:
            continue
        ckpt_infos = [c.tensor_infos()[name] for c in checkpoints]
        rows = _extended_rows(name, info, ckpt_infos) if layout.is_vocabulary_tensor(name) else None
        if rows is None:
            for other in ckpt_infos:
                _check_shape(name, info, other)
        else:
            vocab_size = rows
            logger.info("%s: the checkpoints extend the vocabulary from %d to %d rows", name, info.shape[0], rows)
        tensors.append(
            TensorPlan(
                name=name,
                shape=(rows, *info.shape[1:]) if rows is not None else tuple(info.shape),
                dtype=_output_dtype(info, dtype),
                kind=layout.kind(name),
                block_index=block_index(name),
                base_rows=info.shape[0] if rows is not None else None,
            )
        )
    if dropped:
        logger.info("%s is tied to %s and is written once", dropped, layout.input_embedding)
    return MergePlan(tensors=tensors, dropped_tied=dropped, vocab_size=vocab_size)


def split_plan(tensors: Sequence[TensorPlan], parts: int) -> list[list[TensorPlan]]:
    """The tensors in ``parts`` contiguous runs of about equal size, one per worker (a run may be empty).

    A tensor goes to the run its midpoint falls in when the plan's parameters are laid end to
    end, so the runs follow plan order and the math (which grows with the parameters) is shared
    evenly; every worker computes the same split from the same plan.
    """
    if parts < 1:
        raise ConfigError(f"a merge needs at least one worker, got {parts}")
    sizes = [torch.Size(t.shape).numel() for t in tensors]
    total = max(sum(sizes), 1)
    runs: list[list[TensorPlan]] = [[] for _ in range(parts)]
    done = 0
    for tensor, size in zip(tensors, sizes, strict=True):
        runs[min(parts - 1, (2 * done + size) * parts // (2 * total))].append(tensor)
        done += size
    return runs


def _padded(counts: Tensor, rows: int) -> Tensor:
    """Token counts for ``rows`` vocabulary rows: cut, or padded with zeros for rows no token reached."""
    if counts.shape[0] >= rows:
        return counts[:rows]
    return torch.cat([counts, counts.new_zeros(rows - counts.shape[0])])


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _stats_for(stats: ActivationStats | None, name: str, prefix: str) -> Tensor | None:
    if stats is None:
        return None
    for key in (name, f"{prefix}.{name}" if prefix else None):
        if key is not None and key in stats.sq_sum:
            return stats.input_sq_mean(key)
    return None


@dataclass
class ModelStatistics:
    """The input Grams and Fisher diagonals of the base and of each checkpoint, for methods that read them.

    Each is file-backed (read one tensor at a time) and pickles as a path, so a parallel merge's
    workers receive it whole. ``None`` where the method asks for none.
    """

    base_grams: GramStats | None = None
    checkpoint_grams: list[GramStats] | None = None
    base_fishers: FisherStats | None = None
    checkpoint_fishers: list[FisherStats] | None = None


GRAMS_KEPT = 2
"""Grams kept on the device, by input: tensors of one block come in name order (k, o, q, v), so q and v,
which share k's input, find it still there."""


def _missing(what: str, name: str) -> CheckpointError:
    return CheckpointError(
        f"no {what} for {name}; the statistics do not match this model's parameter names. Recompute them with "
        f"{setting_name('recompute_stats')}."
    )


Inputs = list[Tensor | None]
"""The base's and the K checkpoints' tensors of one name, as stored, on the CPU (see :meth:`MergeEngine.read_inputs`).

A method takes a checkpoint tensor over when it loads it to write into (the slot becomes ``None``);
reading it (:meth:`TensorTask.checkpoint_view`) leaves it there."""


@dataclass
class SharedInputs:
    """Lends one merge of a sweep the inputs every merge reads (:func:`run_together`), without letting it
    write into them: a checkpoint tensor it takes over is a copy in a recycled buffer, kept in
    :attr:`copies` for the caller to give back."""

    buffers: ReadBuffers
    copies: list[Tensor] = field(default_factory=list)

    def blank(self, like: Tensor) -> Tensor:
        """An uninitialised tensor shaped like ``like``, in a recycled buffer (kept in :attr:`copies`)."""
        raw = self.buffers.take(like.numel() * like.element_size())
        blank = raw.view(like.dtype).view(like.shape)
        self.copies.append(blank)
        return blank

    def copy(self, tensor: Tensor) -> Tensor:
        """``tensor`` copied into a recycled buffer (or a fresh one when empty)."""
        if tensor.numel() == 0:
            return tensor.clone()
        copied = self.blank(tensor)
        if tensor.is_contiguous():  # one thread: torch's copy wakes OpenMP threads that then spin on the merge's cores
            numpy.copyto(copied.view(-1).view(torch.uint8).numpy(), tensor.reshape(-1).view(torch.uint8).numpy())
        else:
            copied.copy_(tensor)
        return copied


class MergeEngine:
    """Runs a :class:`MergePlan` with one method over opened readers.

    Args:
        base: Reader of the base model θ_B.
        checkpoints: Readers of the K checkpoints, in the given order.
        method: A built :class:`MergeMethod` for K checkpoints.
        layout: The model layout (for the tied-embedding prefix).
        stats: Per checkpoint, its activation statistics (``None`` for methods that need none).
        statistics: Input Grams and Fisher diagonals of the base and the checkpoints (methods that read them).
        device: Where the math runs (``cpu`` or ``cuda[:N]``); the same code runs on either.
        seed: Global seed; each tensor gets ``derive_seed(seed, name, ...)``.
        new_rows: How vocabulary rows the base lacks are merged (a key of :data:`NEW_ROWS`).
        new_rows_source: The checkpoint the ``best``/``first`` rules take new rows from.
        prefetch: How many tensors ahead the reading thread reads (memory: their inputs).
        saliency_blocks: Decoder blocks whose Linear weights' saliency goes into the report (see
            :attr:`EngineReport.log_saliency`); none by default.
    """

    def __init__(
        self,
        base: CheckpointReader,
        checkpoints: Sequence[CheckpointReader],
        method: MergeMethod,
        layout: ModelLayout,
        stats: Sequence[ActivationStats | None] | None = None,
        *,
        statistics: ModelStatistics | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        new_rows: str = "obim",
        new_rows_source: int = 0,
        prefetch: int = 1,
        saliency_blocks: Sequence[int] = (),
    ) -> None:
        if new_rows not in NEW_ROWS:
            raise ConfigError(f"new_rows must be one of {', '.join(NEW_ROWS)}, not {new_rows!r}")
        if not 0 <= new_rows_source < len(checkpoints):
            raise ConfigError(f"new_rows_source {new_rows_source} is not one of the {len(checkpoints)} checkpoints")
        self.base = base
        self.checkpoints = list(checkpoints)
        self.method = method
        self.layout = layout
        self.stats = list(stats) if stats is not None else [None] * len(self.checkpoints)
        self.statistics = statistics or ModelStatistics()
        self.needs = method.statistics()
        self._grams_kept: OrderedDict[str, tuple[Tensor, list[Tensor]]] = OrderedDict()
        self.device = torch.device(device)
        self.seed = seed
        self.new_rows = new_rows
        self.new_rows_source = new_rows_source
        self.prefetch = max(1, prefetch)
        self.saliency_blocks = frozenset(saliency_blocks)
        self.workspace = Workspace()
        self.notes: Counter[str] = Counter()
        self.read_buffers = ReadBuffers()
        self._reading = threading.Lock()  # readers seek and read a shared file handle

    def _read(self, reader: CheckpointReader, name: str, buffers: ReadBuffers | None = None) -> Tensor:
        """One tensor as stored, on the CPU, checked for NaN/Inf (into a recycled buffer when ``buffers`` lends one)."""
        with self._reading:
            tensor = reader.read(name) if buffers is None else reader.read_into(name, buffers.take)
        return check_finite(tensor, name, reader)

    def read_inputs(self, plan: TensorPlan, buffers: ReadBuffers | None = None) -> Inputs:
        """The base's and every checkpoint's tensor (runs on the reading thread); integer buffers: the base's only.

        With ``buffers``, they are read into recycled memory, which the caller gives back once the
        tensor is merged (a result that is one of them keeps its buffer, see :meth:`_own`).
        """
        base = self._read(self.base, plan.name, buffers)
        if not base.is_floating_point():
            return [base]
        return [base, *(self._read(c, plan.name, buffers) for c in self.checkpoints)]

    def _grams(self, name: str) -> tuple[Tensor, list[Tensor]]:
        """G_B and every G_k of a linear weight, float64 on the device; maps reading one input get the same tensors."""
        base, checkpoints = self.statistics.base_grams, self.statistics.checkpoint_grams
        if base is None or checkpoints is None:
            raise ConfigError(f"method '{self.method.name}' reads input Grams, but the merge was given none")
        model_name = self.layout.model_name(name)
        group = base.group(model_name)
        if group is None:
            raise _missing("input Gram of the base", name)
        if group in self._grams_kept:
            self._grams_kept.move_to_end(group)
            return self._grams_kept[group]
        grams = []
        for which, stats in [("the base", base), *((f"checkpoint {k}", s) for k, s in enumerate(checkpoints))]:
            gram = stats.gram(model_name)
            if gram is None:
                raise _missing(f"input Gram of {which}", name)
            grams.append(gram.to(self.device, torch.float64))
        self._grams_kept[group] = (grams[0], grams[1:])
        if len(self._grams_kept) > GRAMS_KEPT:
            self._grams_kept.popitem(last=False)
        return grams[0], grams[1:]

    def _fishers(self, plan: TensorPlan, rows: slice | None, new: bool) -> tuple[Tensor, list[Tensor]]:
        """F_B and every F_k of a parameter, float32 on the device, restricted to ``rows`` (the base's are zero
        on the new rows of an extended vocabulary, where the base has no parameter)."""
        base, checkpoints = self.statistics.base_fishers, self.statistics.checkpoint_fishers
        if base is None or checkpoints is None:
            raise ConfigError(f"method '{self.method.name}' reads Fisher diagonals, but the merge was given none")
        model_name = self.layout.model_name(plan.name)
        fishers = []
        if plan.name in checkpoints[0].names:  # an MoE expert's F is stored under its stored name (its rows only)
            model_name = plan.name
        for k, stats in enumerate(checkpoints):
            fisher = stats.fisher(model_name, rows)
            if fisher is None:
                raise _missing(f"Fisher diagonal of checkpoint {k}", plan.name)
            fishers.append(fisher.to(self.device, torch.float32))
        base_fisher = torch.zeros_like(fishers[0]) if new else base.fisher(model_name, rows)
        if base_fisher is None:
            raise _missing("Fisher diagonal of the base", plan.name)
        return base_fisher.to(self.device, torch.float32), fishers

    def task(
        self,
        plan: TensorPlan,
        inputs: Inputs | None = None,
        rows: slice | None = None,
        shared: SharedInputs | None = None,
    ) -> TensorTask:
        """The :class:`TensorTask` for one tensor, its inputs on the compute device.

        ``inputs`` as :meth:`read_inputs` gives them (read here when ``None``); a checkpoint taken
        over a second time is read again. ``rows`` restricts the task to rows of the checkpoints'
        tensor (``inputs`` then holds those rows): those the base has (the base as usual), or the
        new rows of an extended vocabulary (the base is zero there, and the seed is derived apart
        so that their random saliency is not a copy of the first rows'). ``shared``: the inputs are
        read by other merges too; the method writes only into copies of them.
        """
        name = plan.name
        if inputs is None:
            inputs = self.read_inputs(plan)
        new = rows is not None and plan.base_rows is not None and rows.start == plan.base_rows
        input_sq = None
        if plan.kind is ParamKind.LINEAR and self.needs.activations:
            input_sq = [_stats_for(s, self.layout.model_name(name), self.layout.prefix) for s in self.stats]
            if any(x is None for x in input_sq):
                raise CheckpointError(
                    f"no activation statistics for Linear weight {name}; the statistics do not match this "
                    f"model's layer names. Recompute them with {setting_name('recompute_stats')}."
                )
            input_sq = [x.to(self.device) for x in input_sq]
        token_counts = None
        first_stats = self.stats[0] if self.stats else None
        if plan.kind is ParamKind.EMBEDDING and first_stats is not None and first_stats.token_counts is not None:
            counts = _padded(first_stats.token_counts.to(torch.float32), plan.shape[0])[rows or slice(None)]
            token_counts = counts.view(-1, *([1] * (len(plan.shape) - 1))).to(self.device)

        def read(k: int) -> Tensor:
            return self._read(self.checkpoints[k], name)[rows or slice(None)]

        def load(k: int) -> Tensor:
            tensor = inputs[k + 1]
            if shared is not None and tensor is not None:  # moving it to a GPU copies it already
                return shared.copy(tensor) if self.device.type == "cpu" else tensor.to(self.device)
            inputs[k + 1] = None
            return (tensor if tensor is not None else read(k)).to(self.device)

        def view(k: int) -> Tensor:
            tensor = inputs[k + 1]
            return tensor if tensor is not None else read(k)

        def result_for(k: int) -> tuple[Tensor, bool]:
            tensor = inputs[k + 1]
            if shared is None or tensor is None or self.device.type != "cpu":
                return load(k), True
            return shared.blank(tensor), False  # the merge fills it: no copy of θ_k

        stored = inputs[0]
        if stored is None:  # the new rows of an extended vocabulary
            like = next(t for t in inputs if t is not None)
            stored = torch.zeros((plan.shape[0] - (plan.base_rows or 0), *plan.shape[1:]), dtype=like.dtype)
        base_stored = stored.to(self.device)
        linear = plan.kind is ParamKind.LINEAR
        base_gram, checkpoint_grams = self._grams(name) if linear and self.needs.grams else (None, None)
        base_fisher, checkpoint_fishers = self._fishers(plan, rows, new) if self.needs.fishers else (None, None)
        return TensorTask(
            name=name,
            _load=load,
            _view=view,
            _result_for=result_for,
            num_models=len(self.checkpoints),
            kind=plan.kind,
            block_index=plan.block_index,
            seed=derive_seed(self.seed, "new-rows") if new else self.seed,
            input_sq_mean=input_sq,
            token_counts=token_counts,
            in_axis=self.layout.in_axis(name) if linear else 1,
            num_blocks=self.layout.num_blocks,
            base_gram=base_gram,
            checkpoint_grams=checkpoint_grams,
            base_fisher=base_fisher,
            checkpoint_fishers=checkpoint_fishers,
            base_stored=base_stored,
            workspace=self.workspace,
        )

    def _own(self, tensor: Tensor) -> Tensor:
        """``tensor``, or a copy when it lives in the workspace (which the next task reuses).

        A result may live in a read buffer (iterative merging returns the first checkpoint's
        tensor): :meth:`run` lends that buffer on until the tensor is written.
        """
        return tensor.clone() if self.workspace.holds(tensor) else tensor

    def _merge_extended(
        self, plan: TensorPlan, inputs: Inputs, shared: SharedInputs | None
    ) -> tuple[Tensor, list[int] | None]:
        """An extended vocabulary tensor: the base's rows as without the extension, then the new rows."""
        assert plan.base_rows is not None
        kept_rows, new_rows = slice(0, plan.base_rows), slice(plan.base_rows, plan.shape[0])
        new_inputs: Inputs = [None, *(t[new_rows] if t is not None else None for t in inputs[1:])]
        kept_inputs: Inputs = [inputs[0], *(t[kept_rows] if t is not None else None for t in inputs[1:])]
        kept = self._merge(self.task(plan, kept_inputs, kept_rows, shared))
        kept_tensor, owned = self._own(kept.tensor), kept.owned
        if self.new_rows == "obim":
            new = self._merge(self.task(plan, new_inputs, new_rows, shared))
            tensor = new.tensor
            if owned is not None and new.owned is not None:
                owned = [a + b for a, b in zip(owned, new.owned, strict=True)]
        elif self.new_rows == "average":
            rows = [t for t in new_inputs[1:] if t is not None]
            tensor = rows[0].to(device=self.device, dtype=torch.float32, copy=True)
            for row in rows[1:]:
                tensor += row.to(self.device)
            tensor /= len(rows)
        else:  # best / first: the source checkpoint was resolved by the caller
            source = new_inputs[1 + self.new_rows_source]
            assert source is not None
            tensor = source.to(self.device)
        return torch.cat([kept_tensor, tensor.to(kept_tensor.device)]), owned

    def _merge(self, task: TensorTask) -> MergeOutput:
        """The method's merge of one task, its notes counted into :attr:`notes`."""
        out = self.method.merge(task)
        if out.notes:
            self.notes.update(out.notes)
        return out

    def merge_one(
        self, plan: TensorPlan, inputs: Inputs, shared: SharedInputs | None = None
    ) -> tuple[Tensor, list[int] | None]:
        """One merged tensor in its output dtype on the CPU (memory it owns), and its ownership counts.

        ``shared``: other merges read ``inputs`` too (see :meth:`task`); the result is then never one of them.
        """
        base = inputs[0]
        assert base is not None
        if not base.is_floating_point():
            # integer buffers are not merged (run() keeps their read buffer until written)
            return (base if shared is None else shared.copy(base)), None
        if plan.base_rows is not None:
            tensor, owned = self._merge_extended(plan, inputs, shared)
        else:
            out = self._merge(self.task(plan, inputs, shared=shared))
            tensor, owned = out.tensor, out.owned
        return self._output(plan, tensor, inputs, shared), owned

    def joint_key(self, plan: TensorPlan) -> Hashable | None:
        """The method's :meth:`~obim_trainer.merging.registry.MergeMethod.joint_key` for this tensor: engines of
        a sweep with equal keys (and equal tasks, see :func:`_same_tasks`) merge it together. ``None``: alone
        (so are integer buffers and extended vocabularies)."""
        if plan.base_rows is not None or not plan.dtype.is_floating_point:
            return None
        return self.method.joint_key(plan.block_index)

    def merge_together(
        self, others: Sequence[MergeEngine], plan: TensorPlan, inputs: Inputs, shared: SharedInputs
    ) -> list[tuple[Tensor, list[int] | None]]:
        """:meth:`merge_one` of this engine and ``others`` (same :meth:`joint_key`, same tasks) in one call of the
        method's ``merge_together``: one task, each input read once for all. The inputs stay ``shared``."""
        engines = [self, *others]
        outputs = self.method.merge_together(self.task(plan, inputs, shared=shared), [e.method for e in engines])
        merged = []
        for engine, out in zip(engines, outputs, strict=True):
            engine.notes.update(out.notes or {})
            merged.append((engine._output(plan, out.tensor, inputs, shared), out.owned))
        return merged

    def _output(self, plan: TensorPlan, tensor: Tensor, inputs: Inputs, shared: SharedInputs | None) -> Tensor:
        """A merged tensor in its output dtype on the CPU, in memory it owns (never one of shared ``inputs``)."""
        tensor = self._own(tensor.to(device="cpu", dtype=plan.dtype))
        if shared is not None and any(t is not None and _same_memory(t, tensor) for t in inputs):
            tensor = shared.copy(tensor)  # a method that returned an input as it is
        return tensor

    def log_saliency(self, plan: TensorPlan, inputs: Inputs) -> list[Tensor] | None:
        """Per checkpoint, log10 of the positive OBM saliencies mean_j(x²)·δ_ij² (eq. 5) of a Linear weight of a
        sampled block, from the inputs as read (before the method takes them over; the merge is untouched).

        ``None`` for other tensors and for methods without activation statistics. Beyond
        :data:`SALIENCY_SAMPLE` values a checkpoint's are sampled with a seed derived from the tensor's name.
        """
        if plan.block_index not in self.saliency_blocks or plan.kind is not ParamKind.LINEAR:
            return None
        if not self.needs.activations or inputs[0] is None or not inputs[0].is_floating_point():
            return None
        base = inputs[0].float()
        rows = slice(0, base.shape[0])  # an extended vocabulary's new rows have no base, hence no δ
        model_name = self.layout.model_name(plan.name)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, plan.name, "saliency-report"))
        sampled = []
        for k, checkpoint in enumerate(inputs[1:]):
            sq_mean = _stats_for(self.stats[k], model_name, self.layout.prefix)
            if checkpoint is None or sq_mean is None:
                return None
            scores = (checkpoint[rows].float() - base).square_().mul_(sq_mean).flatten()
            values = scores[scores > 0].log10_()
            if values.numel() > SALIENCY_SAMPLE:
                values = values[torch.randint(values.numel(), (SALIENCY_SAMPLE,), generator=generator)]
            sampled.append(values)
        return sampled

    def run(
        self,
        plan: MergePlan | Sequence[TensorPlan],
        write: Callable[[str, Tensor], None],
        *,
        progress: bool = True,
        recycle_written: bool = False,
    ) -> EngineReport:
        """Merge the planned tensors and pass each, in the output dtype on the CPU, to ``write``, in plan order.

        The one-merge case of :func:`run_together` (see there for the stages and memory).
        """
        return run_together([self], plan, [write], progress=progress, recycle_written=recycle_written)[0]


def _share_buffers(engines: Sequence[MergeEngine]) -> ReadBuffers:
    """Let every engine read through the first one's buffers and lock (a re-read on the merging thread must
    not seek a file handle the reading thread is using) and compute in its workspace (the engines merge one
    after the other, and a result never stays in the workspace, see :meth:`MergeEngine._own`), so memory
    does not grow by a workspace per engine; the readers must be the same objects."""
    first = engines[0]
    for engine in engines[1:]:
        if engine.base is not first.base or list(map(id, engine.checkpoints)) != list(map(id, first.checkpoints)):
            raise ValueError("engines merged together must share the opened base and checkpoint readers")
        engine.read_buffers, engine._reading, engine.workspace = first.read_buffers, first._reading, first.workspace
    return first.read_buffers


def _same_tasks(engines: Sequence[MergeEngine]) -> list[list[int]]:
    """The engines (by index) that build the same tasks: same readers (see :func:`_share_buffers`), the same
    statistics objects (a sweep loads them once, see ``pipeline/merge.py``), layout and settings."""

    def key(engine: MergeEngine) -> tuple[Any, ...]:
        stats = tuple(map(id, engine.stats))
        statistics = tuple(map(id, vars(engine.statistics).values()))
        settings = (engine.device, engine.seed, engine.new_rows, engine.new_rows_source, id(engine.layout))
        return stats, statistics, settings

    groups: dict[tuple[Any, ...], list[int]] = {}
    for v, engine in enumerate(engines):
        groups.setdefault(key(engine), []).append(v)
    return list(groups.values())


def _merge_units(
    engines: Sequence[MergeEngine], together: Sequence[Sequence[int]], plan: TensorPlan
) -> list[list[int]]:
    """The engines merging ``plan`` in one call each (same tasks, same :meth:`MergeEngine.joint_key`), in order."""
    units: dict[tuple[int, Hashable], list[int]] = {}
    for g, group in enumerate(together):
        for v in group:
            joint = engines[v].joint_key(plan)
            units.setdefault((g, joint if joint is not None else ("alone", v)), []).append(v)
    return sorted(units.values())


def _merge_unit(
    engines: Sequence[MergeEngine], unit: Sequence[int], plan: TensorPlan, inputs: Inputs, shared: SharedInputs | None
) -> list[tuple[Tensor, list[int] | None]]:
    """The merged tensors and ownership counts of the engines of one unit (see :func:`_merge_units`)."""
    if len(unit) == 1:
        return [engines[unit[0]].merge_one(plan, inputs, shared)]
    assert shared is not None
    return engines[unit[0]].merge_together([engines[v] for v in unit[1:]], plan, inputs, shared)


def _not_among(tensors: Sequence[Tensor | None], kept: Sequence[Tensor]) -> list[Tensor]:
    """The ``tensors`` whose memory none of ``kept`` uses."""
    return [t for t in tensors if t is not None and not any(_same_memory(t, k) for k in kept)]


def _written(buffers: ReadBuffers, tensor: Tensor, recycle: bool) -> None:
    """After ``write`` returned: a result living in a read buffer gives it back, or takes it along."""
    if recycle:
        buffers.give_back([tensor])
    else:
        buffers.keep(tensor)


def run_together(
    engines: Sequence[MergeEngine],
    plan: MergePlan | Sequence[TensorPlan],
    writes: Sequence[Callable[[str, Tensor], None]],
    *,
    progress: bool = True,
    recycle_written: bool = False,
) -> list[EngineReport]:
    """Merge the planned tensors with every engine (same readers, own method and statistics), each tensor's
    inputs read once; engine v's results go to ``writes[v]``, in plan order. One report per engine.

    Three stages overlap: a reading thread reads (and checks) the inputs of the next ``prefetch``
    tensors, this thread merges the current one with each engine in turn, and one writing thread per
    engine writes each of its results as soon as it is merged (merging a tensor waits for the writes of the tensor
    two before it; the previous one's may still be running). Inputs are read into recycled buffers, given back once
    merged. ``recycle_written``: the writes keep nothing of the tensors they get (they copy them to
    a file), so a result's buffer is recycled too once written; otherwise results keep their
    memory. Memory: the inputs of 1 + ``prefetch`` tensors, the copies one engine takes over, two results
    per engine, the recycled buffers, and one workspace (a few buffers the size of the largest tensor).
    """
    if len(writes) != len(engines) or not engines:
        raise ValueError(f"run_together needs one write per engine, got {len(writes)} for {len(engines)}")
    buffers = _share_buffers(engines)
    first = engines[0]
    together = _same_tasks(engines)
    tensors = list(plan.tensors if isinstance(plan, MergePlan) else plan)
    reports = [EngineReport() for _ in engines]
    start = time.perf_counter()
    desc = f"merging ({', '.join(e.method.name for e in engines)})"
    bar = tqdm(total=len(tensors), desc=desc, unit="tensor", disable=not progress)
    reads = ThreadPoolExecutor(1, thread_name_prefix="obim-read")
    # one writing thread per output: a sweep's outputs are written side by side while this thread waits for them
    writers = [ThreadPoolExecutor(1, thread_name_prefix=f"obim-write-{v}") for v in range(len(writes))]
    read = partial(first.read_inputs, buffers=buffers)
    queued: deque[Future[Inputs]] = deque(reads.submit(read, t) for t in tensors[: first.prefetch])
    writing: deque[list[tuple[Future[None], Tensor]]] = deque()  # per tensor, oldest first: its results' writes

    def finish_writes(keep: int) -> None:
        """Wait for the writes of all but the newest ``keep`` tensors (their buffers recycled)."""
        while len(writing) > keep:
            for future, tensor in writing.popleft():
                future.result()
                _written(buffers, tensor, recycle_written)

    try:
        for i, tensor_plan in enumerate(tensors):
            bar.set_postfix_str(tensor_plan.name, refresh=False)
            shared = queued.popleft().result()
            if i + first.prefetch < len(tensors):
                queued.append(reads.submit(read, tensors[i + first.prefetch]))
            finish_writes(keep=1)  # the tensor two before is written; the previous one's may still be writing
            results: list[tuple[Future[None], Tensor]] = []
            writing.append(results)
            units = _merge_units(engines, together, tensor_plan)
            for u, unit in enumerate(units):
                for v in unit:
                    saliency = engines[v].log_saliency(tensor_plan, shared)
                    if saliency is not None:
                        reports[v].log_saliency[tensor_plan.name] = saliency
                # every merge but the last reads the inputs in place and takes copies over; the last takes them
                lending = None if u == len(units) - 1 and len(unit) == 1 else SharedInputs(buffers)
                merged = _merge_unit(engines, unit, tensor_plan, list(shared), lending)
                if lending is not None:  # the copies it took over, but those that became results
                    buffers.give_back(_not_among(lending.copies, [m for m, _ in merged]))
                del lending
                for v, (tensor, owned) in zip(unit, merged, strict=True):
                    if owned is not None:
                        reports[v].owned[tensor_plan.name] = list(owned)
                    results.append((writers[v].submit(writes[v], tensor_plan.name, tensor), tensor))  # meanwhile
                del merged, tensor
            buffers.give_back(_not_among(shared, [t for _, t in results]))  # the inputs, but a result taken over
            del shared, results
            bar.update()
        finish_writes(keep=0)
    finally:
        for future in queued:
            future.cancel()
        reads.shutdown()
        for writing_thread in writers:
            writing_thread.shutdown()
        bar.close()
    seconds = time.perf_counter() - start
    for report, engine in zip(reports, engines, strict=True):
        report.seconds = seconds
        report.notes = dict(engine.notes)
    return reports
