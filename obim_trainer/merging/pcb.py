"""PCB-Merging (Du et al. 2024, "Parameter Competition Balancing for Model Merging").

Per entry of each task vector δ_k (as in the authors' released code):

* intra-balancing exp(K·norm(|δ_k|)²) favours entries that are large within their own task;
* inter-balancing tanh(δ_k·Σ_j δ_j) favours entries that agree with the others (negative when not);
* their product is clamped from below at its (1 − ratio) quantile and min-max normalized, so only
  the top ``ratio`` of each task vector keeps a (graded) weight β_k;
* θ_M = θ_B + λ·Σ_k β_k·δ̃_k / Σ_k β_k, where δ̃_k is δ_k with its magnitudes clamped to their
  [0.01%, 99.99%] quantiles (outliers).

``norm`` is min-max normalization per task vector; a constant one (a zero task vector, or a tensor
of one entry) normalizes to 0, where the paper's code divides by zero. The paper flattens the whole
model before ranking; a streaming merge does it per tensor. Quantiles use ``torch.kthvalue`` (no sort).
"""

from __future__ import annotations

import torch
from pydantic import ConfigDict, Field
from torch import Tensor

from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.task import MergeOutput, TensorTask

OUTLIER_RATIO = 1e-4
"""Share of each task vector's smallest and largest magnitudes clamped (the authors' code)."""
EPS = 1e-12


def min_max_normalize_(x: Tensor) -> Tensor:
    """(x − min) / (max − min) per row, in place; a constant row becomes zeros."""
    low = x.amin(dim=1, keepdim=True)
    span = x.amax(dim=1, keepdim=True).sub_(low)
    return x.sub_(low).div_(span.masked_fill_(span <= 0, 1.0))


def row_quantile(x: Tensor, index: int) -> Tensor:
    """The ``index``-th smallest value (0-based) of each row, shaped [rows, 1]."""
    index = min(max(index, 0), x.shape[1] - 1)
    return torch.kthvalue(x, index + 1, dim=1, keepdim=True).values


def quantile_clamp_(x: Tensor, low_ratio: float, high_ratio: float) -> Tensor:
    """Clamp each row, in place, to its order statistics ⌊d·low_ratio⌋ and ⌊d·(1 − high_ratio)⌋ − 1."""
    width = x.shape[1]
    low = row_quantile(x, int(width * low_ratio))
    high = row_quantile(x, int(width * (1 - high_ratio)) - 1) if high_ratio > 0 else None
    return x.clamp_(min=low, max=high)


class PCBParams(MethodParams):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    ratio: float = Field(default=0.1, ge=0.0, le=1.0, description="share r of each task vector kept (paper: 0.1)")
    lambda_: float = Field(default=1.0, alias="lambda", description="scale λ of the merged task vector")


@register_method
class PCB(MergeMethod):
    name = "pcb"
    summary = "PCB-Merging (Du et al. 2024): intra- and inter-task balancing, keep the top `ratio`, weighted mean."
    Params = PCBParams

    def merge(self, task: TensorTask) -> MergeOutput:
        if self.params.ratio <= 0:
            return MergeOutput(tensor=task.base.clone())
        n = task.num_models
        deltas = torch.empty((n, task.base.numel()), dtype=torch.float32, device=task.device)
        for k in range(n):
            deltas[k] = task.delta(k).reshape(-1)
        magnitude = quantile_clamp_(deltas.abs(), OUTLIER_RATIO, OUTLIER_RATIO)
        score = min_max_normalize_(magnitude.clone()).square_().mul_(n).exp_()  # intra-balancing
        score.mul_(torch.mul(deltas, deltas.sum(dim=0)).tanh_())  # inter-balancing
        weight = min_max_normalize_(quantile_clamp_(score, 1 - self.params.ratio, 0))
        del score
        clamped = deltas.sign_().mul_(magnitude)
        del magnitude
        merged = clamped.mul_(weight).sum(dim=0).div_(weight.sum(dim=0).clamp_min_(EPS))
        return MergeOutput(tensor=merged.mul_(self.params.lambda_).view(task.base.shape).add_(task.base))
