"""The streaming merge engine: one tensor name at a time, from the readers through a method into the writer.

The engine validates that the base and the K checkpoints describe the same model
(names, shapes), decides each tensor's output dtype, and then, per tensor, reads the
base, hands the method lazy access to the checkpoints, checks every input for NaN/Inf
and writes the result. It knows block indices (for the merge order) and nothing else
about the method; memory is a few tensors, never the model.

Extended vocabularies: continued pre-training for a new language often adds tokens
(``resize_token_embeddings``), so the checkpoints' embedding and lm_head have more rows than
the base's. The rows the base has are merged exactly as without the extension (same task,
same counts, same seeds), and the new rows, which have no base value, by the ``new_rows``
rule (see :data:`NEW_ROWS`).
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
from obim_trainer.merging.task import derive_seed
from obim_trainer.model_layout import ModelLayout, block_index

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
    run of an fp32 base), the base is the one model every input shares."""
    return DTYPES[requested] if requested != "auto" else base.dtype


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


def _padded(counts: Tensor, rows: int) -> Tensor:
    """Token counts for ``rows`` vocabulary rows: cut, or padded with zeros for rows no token reached."""
    if counts.shape[0] >= rows:
        return counts[:rows]
    return torch.cat([counts, counts.new_zeros(rows - counts.shape[0])])


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
        new_rows: How vocabulary rows the base lacks are merged (a key of :data:`NEW_ROWS`).
        new_rows_source: The checkpoint the ``best``/``first`` rules take new rows from.
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
        new_rows: str = "obim",
        new_rows_source: int = 0,
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
        self.device = torch.device(device)
        self.seed = seed
        self.new_rows = new_rows
        self.new_rows_source = new_rows_source

    def task(self, plan: TensorPlan, rows: slice | None = None) -> TensorTask:
        """The :class:`TensorTask` for one tensor, with checkpoints loaded lazily.

        ``rows`` restricts it to rows of the checkpoints' tensor: those the base has (the base as
        usual), or the new rows of an extended vocabulary (the base is zero there, and the seed is
        derived apart so that their random saliency is not a copy of the first rows').
        """
        name = plan.name
        new = rows is not None and plan.base_rows is not None and rows.start == plan.base_rows
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
            counts = _padded(first_stats.token_counts.to(torch.float32), plan.shape[0])[rows or slice(None)]
            token_counts = counts.view(-1, *([1] * (len(plan.shape) - 1))).to(self.device)

        def load(k: int) -> Tensor:
            tensor = _read_finite(self.checkpoints[k], name, self.device)
            return tensor if rows is None else tensor[rows]

        if new:
            base = torch.zeros((plan.shape[0] - plan.base_rows, *plan.shape[1:]), device=self.device)
        else:
            base = _read_finite(self.base, name, self.device)
        return TensorTask(
            name=name,
            base=base,
            _load=load,
            num_models=len(self.checkpoints),
            kind=plan.kind,
            block_index=plan.block_index,
            seed=derive_seed(self.seed, "new-rows") if new else self.seed,
            input_sq_mean=input_sq,
            token_counts=token_counts,
        )

    def _merge_extended(self, plan: TensorPlan) -> tuple[Tensor, list[int] | None]:
        """An extended vocabulary tensor: the base's rows as without the extension, then the new rows."""
        assert plan.base_rows is not None
        kept = self.method.merge(self.task(plan, slice(0, plan.base_rows)))
        new_rows = slice(plan.base_rows, plan.shape[0])
        owned = kept.owned
        if self.new_rows == "obim":
            new = self.method.merge(self.task(plan, new_rows))
            tensor = new.tensor
            if owned is not None and new.owned is not None:
                owned = [a + b for a, b in zip(owned, new.owned, strict=True)]
        elif self.new_rows == "average":
            tensor = _read_finite(self.checkpoints[0], plan.name, self.device)[new_rows].clone()
            for checkpoint in self.checkpoints[1:]:
                tensor += _read_finite(checkpoint, plan.name, self.device)[new_rows]
            tensor /= len(self.checkpoints)
        else:  # best / first: the source checkpoint was resolved by the caller
            tensor = _read_finite(self.checkpoints[self.new_rows_source], plan.name, self.device)[new_rows]
        return torch.cat([kept.tensor, tensor.to(kept.tensor.device)]), owned

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
            if tensor_plan.base_rows is not None:
                tensor, owned = self._merge_extended(tensor_plan)
            else:
                out = self.method.merge(self.task(tensor_plan))
                tensor, owned = out.tensor, out.owned
            write(tensor_plan.name, tensor.to(dtype=tensor_plan.dtype).cpu())
            if owned is not None:
                report.owned[tensor_plan.name] = list(owned)
        report.seconds = time.perf_counter() - start
        return report
