"""PCB-Merging (Du et al. 2024): balance parameter competition within and across task vectors.

Intra-balancing exp(K·norm(|δ|)²) favours entries large within their own task; inter-balancing
tanh(δ_k·Σ_j δ_j) favours entries that agree with the others. Their product is clamped below
its (1 − ratio) quantile and min-max normalized, so only the top ``ratio`` of each task
vector keeps a weight; the merge is the weighted mean of the (outlier-clamped) task vectors.
The paper flattens the whole model; a streaming merge applies it per tensor.
"""

from __future__ import annotations

import torch
from pydantic import ConfigDict, Field
from torch import Tensor

from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.task import MergeOutput, TensorTask

OUTLIER_RATIO = 1e-4
EPS = 1e-12


def min_max_normalize(x: Tensor) -> Tensor:
    """(x − min) / (max − min) per row; a constant row becomes zeros (the paper divides by zero there)."""
    low = x.min(dim=1, keepdim=True).values
    high = x.max(dim=1, keepdim=True).values
    return (x - low) / (high - low).clamp_min(EPS)


def quantile_clamp(x: Tensor, low_ratio: float, high_ratio: float) -> Tensor:
    """Clamp each row to its [low_ratio, 1 − high_ratio] order statistics (the paper's ``clamp``)."""
    d = x.shape[1]
    ordered = x.sort(dim=1).values
    low = ordered[:, min(d - 1, int(d * low_ratio))].unsqueeze(1)
    high = ordered[:, max(0, int(d * (1 - high_ratio)) - 1)].unsqueeze(1)
    return torch.maximum(torch.minimum(x, high), low)


class PCBParams(MethodParams):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    ratio: float = Field(default=0.1, gt=0.0, le=1.0, description="share of each task vector kept")
    lambda_: float = Field(default=1.0, alias="lambda", description="scale of the merged task vector")


@register_method
class PCB(MergeMethod):
    name = "pcb"
    summary = "PCB-Merging: intra- and inter-task balancing, drop to the top `ratio`, weighted mean."
    Params = PCBParams

    def merge(self, task: TensorTask) -> MergeOutput:
        n = task.num_models
        deltas = torch.stack([task.delta(k).reshape(-1) for k in range(n)])
        magnitude = quantile_clamp(deltas.abs(), OUTLIER_RATIO, OUTLIER_RATIO)
        clamped = deltas.sign() * magnitude
        intra = torch.exp(n * min_max_normalize(magnitude) ** 2)
        inter = torch.tanh(deltas * deltas.sum(dim=0))
        scale = min_max_normalize(quantile_clamp(intra * inter, 1 - self.params.ratio, 0))
        merged = (clamped * scale).sum(dim=0) / scale.sum(dim=0).clamp_min(EPS)
        return MergeOutput(tensor=task.base + self.params.lambda_ * merged.view(task.base.shape))
