"""What a merge did, per layer type, measured on a few decoder blocks.

Logging every tensor of a 7B merge would be noise; a handful of evenly spaced decoder blocks
shows the shape of it. For each sampled tensor the engine builds the same task it merged
(same statistics, same seed), and from that task this module takes:

* the OBM saliency s_ij = mean_j(x²)·δ_ij² (eq. 5) of each checkpoint's Linear weights, as a
  histogram of log10(s) per layer type — how concentrated each checkpoint's changes are;
* how many positions each checkpoint owns after iterative merging (Algorithm 1), re-running
  the method on the task — the share of each checkpoint per layer type, and the fraction of
  positions that took any checkpoint's change at all (the rest keep the base).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from obim_trainer.calibration import ActivationStats
from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.merging import MergeMethod, ParamKind, TensorTask
from obim_trainer.merging.saliency import obm_saliency, scores_tensor
from obim_trainer.pipeline.engine import MergeEngine, TensorPlan, plan_merge
from obim_trainer.pipeline.layout import BLOCK_INDEX, ModelLayout
from obim_trainer.tracking.payload import Histogram

logger = logging.getLogger(__name__)

MAX_VALUES_PER_TENSOR = 1 << 20


def layer_type(name: str) -> str:
    """The tensor's name inside its decoder block (``model.layers.7.mlp.up_proj.weight`` → ``mlp.up_proj``)."""
    match = BLOCK_INDEX.search(name)
    inner = name[match.end() :] if match else name
    return inner.removesuffix(".weight")


def block_group(tensor: TensorPlan) -> str:
    """Group tensors by decoder block (``block 7``), for :func:`summarize_merge`."""
    return f"block {tensor.block_index}"


def sampled_blocks(block_indices: set[int], count: int) -> list[int]:
    """``count`` evenly spaced decoder blocks, first and last included."""
    ordered = sorted(block_indices)
    if len(ordered) <= count:
        return ordered
    if count == 1:
        return [ordered[len(ordered) // 2]]
    return sorted({ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)})


@dataclass
class LayerSummary:
    """One layer type over the sampled blocks; lists run over the checkpoints in merge order."""

    numel: int = 0
    owned: list[int] | None = None
    log_saliency: list[list[Tensor]] = field(default_factory=list)

    def ownership_share(self) -> list[float] | None:
        return None if self.owned is None else [c / self.numel for c in self.owned]

    def retained_fraction(self) -> float | None:
        """Share of positions that took some checkpoint's change."""
        return None if self.owned is None else sum(self.owned) / self.numel

    def histograms(self, bins: int) -> list[Histogram | None]:
        """Per checkpoint, a histogram of log10 saliency on one range shared by all checkpoints."""
        pooled = [torch.cat(values) if values else torch.empty(0) for values in self.log_saliency]
        present = [v for v in pooled if v.numel()]
        if not present:
            return [None] * len(pooled)
        low = min(float(v.min()) for v in present)
        high = max(float(v.max()) for v in present)
        high = high if high > low else low + 1.0
        edges = torch.linspace(low, high, bins + 1).tolist()
        return [
            Histogram(torch.histc(v, bins=bins, min=low, max=high).long().tolist(), edges) if v.numel() else None
            for v in pooled
        ]


def _sample(values: Tensor, generator: torch.Generator) -> Tensor:
    if values.numel() <= MAX_VALUES_PER_TENSOR:
        return values
    return values[torch.randint(values.numel(), (MAX_VALUES_PER_TENSOR,), generator=generator)]


def _log_saliency(task: TensorTask, k: int, generator: torch.Generator) -> Tensor:
    scores = scores_tensor(obm_saliency(task, k, lambda: task.delta(k))).flatten()
    return _sample(scores[scores > 0].log10(), generator)


def summarize_merge(
    base: Path,
    checkpoints: Sequence[Path],
    method: MergeMethod,
    stats: Sequence[ActivationStats | None],
    *,
    seed: int = 0,
    blocks: int = 3,
    group_by: Callable[[TensorPlan], str] | None = None,
) -> dict[str, LayerSummary]:
    """Per layer type, saliency and ownership over ``blocks`` sampled decoder blocks of a merge.

    ``group_by`` names the group of each tensor instead (e.g. :func:`block_group` for one summary
    per decoder block); ``blocks`` still chooses which blocks are visited.
    """
    group = group_by or (lambda tensor: layer_type(tensor.name))
    summaries: dict[str, LayerSummary] = {}
    with ExitStack() as stack:
        base_reader = stack.enter_context(open_checkpoint(base))
        readers = [stack.enter_context(open_checkpoint(c)) for c in checkpoints]
        layout = ModelLayout.from_pretrained_dir(base)
        plan = plan_merge(base_reader, readers, layout)
        engine = MergeEngine(base_reader, readers, method, layout, stats, seed=seed)
        chosen = set(sampled_blocks({t.block_index for t in plan.tensors if t.block_index is not None}, blocks))
        generator = torch.Generator().manual_seed(seed)
        for tensor in plan.tensors:
            if tensor.block_index in chosen and tensor.dtype.is_floating_point:
                _add_tensor(summaries.setdefault(group(tensor), LayerSummary()), engine, tensor, generator)
    logger.debug("merge summary over blocks %s: %d layer types", sorted(chosen), len(summaries))
    return summaries


def _add_tensor(summary: LayerSummary, engine: MergeEngine, tensor: TensorPlan, generator: torch.Generator) -> None:
    task = engine.task(tensor)
    owned = engine.method.merge(task).owned
    summary.numel += math.prod(tensor.shape)
    if owned is not None:
        summary.owned = [a + b for a, b in zip(summary.owned or [0] * len(owned), owned, strict=True)]
    if tensor.kind is ParamKind.LINEAR and task.input_sq_mean is not None:
        if not summary.log_saliency:
            summary.log_saliency = [[] for _ in range(task.num_models)]
        for k in range(task.num_models):
            summary.log_saliency[k].append(_log_saliency(task, k, generator))
