"""The streaming merge engine: one tensor name at a time, from the readers through a method into the writer.

The engine validates that the base and the K checkpoints describe the same model
(names, shapes), decides each tensor's output dtype, and then, per tensor, reads the
base, hands the method lazy access to the checkpoints, checks every input for NaN/Inf
and writes the result. It knows block indices (for the merge order) and nothing else
about the method; memory is a few tensors, never the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from obim_trainer.calibration import ActivationStats
from obim_trainer.checkpoints import CheckpointReader, TensorInfo
from obim_trainer.errors import CheckpointError, ConfigError
from obim_trainer.merging import MergeMethod, ParamKind, TensorTask
from obim_trainer.model_layout import ModelLayout, block_index

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LIST_LIMIT = 5


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to merge: where it sits in the network and how it is written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: ParamKind
    block_index: int | None


@dataclass
class MergePlan:
    """The validated list of tensors to merge, in write order."""

    tensors: list[TensorPlan]
    dropped_tied: str | None = None

    @property
    def num_parameters(self) -> int:
        return sum(torch.Size(t.shape).numel() for t in self.tensors)

    def write_plan(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(t.name, t.shape, t.dtype) for t in self.tensors]


@dataclass
class EngineReport:
    """What the streaming pass measured: ownership per tensor and time spent."""

    owned: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0

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


def _check_shape(name: str, base: TensorInfo, other: TensorInfo, layout: ModelLayout) -> None:
    if base.shape == other.shape:
        return
    if layout.is_vocabulary_tensor(name) and base.shape[1:] == other.shape[1:]:
        raise CheckpointError(
            f"tensor {name}: the base {base.file} has {base.shape[0]} vocabulary rows but {other.file} has "
            f"{other.shape[0]}. Resized embeddings (an extended vocabulary) are not supported yet; merge "
            "checkpoints that keep the base's vocabulary."
        )
    raise CheckpointError(
        f"tensor {name} has shape {tuple(base.shape)} in the base ({base.file}) but {tuple(other.shape)} in "
        f"{other.file}. Checkpoints must have the base's architecture."
    )


def _output_dtype(name: str, infos: Sequence[TensorInfo], requested: str) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    dtypes = {info.dtype for info in infos}
    if len(dtypes) > 1:
        found = ", ".join(f"{info.file}: {info.dtype}" for info in infos)
        raise ConfigError(
            f"tensor {name} is stored in different dtypes by the checkpoints ({found}); "
            "choose the output dtype with --dtype float32|bfloat16|float16"
        )
    return dtypes.pop()


def plan_merge(
    base: CheckpointReader,
    checkpoints: Sequence[CheckpointReader],
    layout: ModelLayout,
    dtype: str = "auto",
) -> MergePlan:
    """Validate that all inputs describe the same model and list the tensors to merge.

    Raises :class:`CheckpointError` on missing/extra tensors and shape mismatches and
    :class:`ConfigError` when the output dtype is ambiguous; each names the file and tensor.
    """
    if not checkpoints:
        raise ConfigError("no checkpoints to merge (K = 0); give at least one checkpoint folder")
    all_names = set(base.tensor_infos()).union(*(set(c.tensor_infos()) for c in checkpoints))
    dropped = layout.redundant_tied_name(all_names)
    ignore = {dropped} if dropped else set()
    for ckpt in checkpoints:
        _check_same_names(base, ckpt, ignore)
    tensors = []
    for name, info in base.tensor_infos().items():
        if name in ignore:
            continue
        ckpt_infos = [c.tensor_infos()[name] for c in checkpoints]
        for other in ckpt_infos:
            _check_shape(name, info, other, layout)
        tensors.append(
            TensorPlan(
                name=name,
                shape=tuple(info.shape),
                dtype=_output_dtype(name, ckpt_infos, dtype),
                kind=layout.kind(name),
                block_index=block_index(name),
            )
        )
    if dropped:
        logger.info("%s is tied to %s and is written once", dropped, layout.input_embedding)
    return MergePlan(tensors=tensors, dropped_tied=dropped)


def _read_finite(reader: CheckpointReader, name: str, device: torch.device) -> Tensor:
    tensor = reader.read(name).to(device=device, dtype=torch.float32)
    # NaN/Inf propagate into the sum; only a suspicious sum (or an overflow) pays for the exact check
    if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(
            f"tensor {name} in {reader.tensor_infos()[name].file} contains NaN or Inf. The checkpoint is "
            "broken (diverged training?); leave it out of the merge."
        )
    return tensor


def _stats_for(stats: ActivationStats | None, name: str, prefix: str) -> Tensor | None:
    if stats is None:
        return None
    for key in (name, f"{prefix}.{name}" if prefix else None):
        if key is not None and key in stats.sq_sum:
            return stats.input_sq_mean(key)
    return None


class MergeEngine:
    """Runs a :class:`MergePlan` with one method over opened readers.

    Args:
        base: Reader of the base model θ_B.
        checkpoints: Readers of the K checkpoints, in the given order.
        method: A built :class:`MergeMethod` for K checkpoints.
        layout: The model layout (for the tied-embedding prefix).
        stats: Per checkpoint, its activation statistics (``None`` for methods that need none).
        device: Where the math runs.
        seed: Global seed; each tensor gets ``derive_seed(seed, name, ...)``.
    """

    def __init__(
        self,
        base: CheckpointReader,
        checkpoints: Sequence[CheckpointReader],
        method: MergeMethod,
        layout: ModelLayout,
        stats: Sequence[ActivationStats | None] | None = None,
        *,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        self.base = base
        self.checkpoints = list(checkpoints)
        self.method = method
        self.layout = layout
        self.stats = list(stats) if stats is not None else [None] * len(self.checkpoints)
        self.device = torch.device(device)
        self.seed = seed

    def task(self, plan: TensorPlan) -> TensorTask:
        """The :class:`TensorTask` for one tensor, with checkpoints loaded lazily."""
        name = plan.name
        input_sq = None
        if plan.kind is ParamKind.LINEAR and self.method.needs_activation_stats:
            input_sq = [_stats_for(s, name, self.layout.prefix) for s in self.stats]
            if any(x is None for x in input_sq):
                raise CheckpointError(
                    f"no activation statistics for Linear weight {name}; the statistics do not match this "
                    "model's layer names. Recompute them with --recompute-stats."
                )
            input_sq = [x.to(self.device) for x in input_sq]
        token_counts = None
        first_stats = self.stats[0] if self.stats else None
        if plan.kind is ParamKind.EMBEDDING and first_stats is not None and first_stats.token_counts is not None:
            counts = first_stats.token_counts[: plan.shape[0]].to(torch.float32)
            token_counts = counts.view(-1, *([1] * (len(plan.shape) - 1))).to(self.device)

        def load(k: int) -> Tensor:
            return _read_finite(self.checkpoints[k], name, self.device)

        return TensorTask(
            name=name,
            base=_read_finite(self.base, name, self.device),
            _load=load,
            num_models=len(self.checkpoints),
            kind=plan.kind,
            block_index=plan.block_index,
            seed=self.seed,
            input_sq_mean=input_sq,
            token_counts=token_counts,
        )

    def run(
        self,
        plan: MergePlan,
        write: Callable[[str, Tensor], None],
        *,
        progress: bool = True,
    ) -> EngineReport:
        """Merge every planned tensor and pass it, in the output dtype on the CPU, to ``write``."""
        report = EngineReport()
        start = time.perf_counter()
        bar = tqdm(plan.tensors, desc=f"merging ({self.method.name})", unit="tensor", disable=not progress)
        for tensor_plan in bar:
            bar.set_postfix_str(tensor_plan.name, refresh=False)
            if not self.base.tensor_infos()[tensor_plan.name].dtype.is_floating_point:
                write(tensor_plan.name, self.base.read(tensor_plan.name))  # integer buffers are not merged
                continue
            out = self.method.merge(self.task(tensor_plan))
            write(tensor_plan.name, out.tensor.to(dtype=tensor_plan.dtype).cpu())
            if out.owned is not None:
                report.owned[tensor_plan.name] = list(out.owned)
        report.seconds = time.perf_counter() - start
        return report
