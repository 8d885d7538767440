"""What a merge did, per layer type, from the engine's own report of that merge.

Logging every tensor of a 7B merge would be noise; one summary per layer type (or per decoder
block) shows the shape of it. Everything comes from the :class:`~obim_trainer.pipeline.engine.EngineReport`
the merge returned, so the numbers logged are those of the model written:

* the OBM saliency s_ij = mean_j(x²)·δ_ij² (eq. 5) of each checkpoint's Linear weights on a few
  evenly spaced decoder blocks, as a histogram of log10(s) per layer type — how concentrated each
  checkpoint's changes are;
* how many positions each checkpoint owns after iterative merging (Algorithm 1), over every decoder
  block — the share of each checkpoint per layer type, and the fraction of positions that took any
  checkpoint's change at all (the rest keep the base).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from obim_trainer.pipeline.engine import EngineReport, MergePlan, TensorPlan, sampled_blocks
from obim_trainer.pipeline.layout import BLOCK_INDEX
from obim_trainer.tracking.payload import Histogram

__all__ = ["LayerSummary", "block_group", "layer_type", "sampled_blocks", "summarize_report"]


def layer_type(name: str) -> str:
    """The tensor's name inside its decoder block (``model.layers.7.mlp.up_proj.weight`` → ``mlp.up_proj``)."""
    match = BLOCK_INDEX.search(name)
    inner = name[match.end() :] if match else name
    return inner.removesuffix(".weight")


def block_group(tensor: TensorPlan) -> str:
    """Group tensors by decoder block (``block 7``), for :func:`summarize_report`."""
    return f"block {tensor.block_index}"


@dataclass
class LayerSummary:
    """One group of tensors; lists run over the checkpoints in merge order."""

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


def summarize_report(
    report: EngineReport, plan: MergePlan, group_by: Callable[[TensorPlan], str] | None = None
) -> dict[str, LayerSummary]:
    """Per layer type (``group_by`` names another group, e.g. :func:`block_group`), the ownership of every
    decoder-block tensor and the saliency the engine sampled, as the merge reported them."""
    group = group_by or (lambda tensor: layer_type(tensor.name))
    summaries: dict[str, LayerSummary] = {}
    for tensor in plan.tensors:
        owned, saliency = report.owned.get(tensor.name), report.log_saliency.get(tensor.name)
        if tensor.block_index is None or not tensor.dtype.is_floating_point:
            continue
        summary = summaries.setdefault(group(tensor), LayerSummary())
        if owned is not None:
            summary.numel += math.prod(tensor.shape)
            summary.owned = [a + b for a, b in zip(summary.owned or [0] * len(owned), owned, strict=True)]
        if saliency is not None:
            summary.log_saliency = summary.log_saliency or [[] for _ in saliency]
            for values, sampled in zip(summary.log_saliency, saliency, strict=True):
                values.append(sampled)
    return summaries
