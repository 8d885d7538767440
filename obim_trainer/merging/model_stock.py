"""Model Stock (Jang et al. 2024): move from the base toward the checkpoints' average by
t = N·cos θ / (1 + (N − 1)·cos θ), where cos θ is the mean cosine between the N task vectors.

The derivation assumes the fine-tuned weights lie around a common centre at angle θ < 90°.
With cos θ ≤ 0 the checkpoints disagree and the formula leaves [0, 1]: t < 0 pushes away from
the average, and near cos θ = −1/(N − 1) it explodes. ``clip_cos: true`` (default) treats
cos θ ≤ 0 as 0, so such a tensor keeps the base (t = 0); ``clip_cos: false`` reproduces
mergekit, which only maps the singular point itself to the base.

Cosines are exact (the product of norms is not clamped as mergekit does at 1e-6, which biases
cos θ toward 0 for task vectors with norms below 1e-3). Streams one task vector at a time:
the sum of the task vectors, the sum of their unit vectors and the pairwise dot products.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.task import MergeOutput, TensorTask

SINGULAR_EPS = 1e-6
"""mergekit keeps the base where |1 + (N − 1)·cos θ| is below this."""


def _filters(tensor: Tensor, filter_wise: bool) -> Tensor:
    """The tensor as [filters, entries]: one filter per output row, or the whole tensor as one."""
    if filter_wise and tensor.dim() >= 2:
        return tensor.reshape(-1, tensor.shape[-1])
    return tensor.reshape(1, -1)


def interpolation_ratio(cos: Tensor, num_models: int, clip_cos: bool) -> Tensor:
    """t = N·cos / (1 + (N − 1)·cos), 0 at the singular point and, with ``clip_cos``, for cos ≤ 0."""
    if clip_cos:
        cos = cos.clamp_min(0.0)
    denominator = 1 + (num_models - 1) * cos
    singular = denominator.abs() < SINGULAR_EPS
    ratio = num_models * cos / torch.where(singular, torch.ones_like(denominator), denominator)
    return ratio.masked_fill_(singular, 0.0)


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(default=False, description="one t per output row instead of one per tensor (mergekit)")
    clip_cos: bool = Field(default=True, description="treat cos θ ≤ 0 as 0, keeping the base (false: mergekit's t)")


@register_method
class ModelStock(MergeMethod):
    name = "model_stock"
    summary = "Model Stock (Jang et al. 2024): interpolate base → checkpoint average by the angle between task vectors."
    Params = ModelStockParams
    min_models = 2

    def merge(self, task: TensorTask) -> MergeOutput:
        base = _filters(task.base, self.params.filter_wise)
        total = torch.zeros_like(base)
        unit_total = torch.zeros_like(base)
        pair_dots = torch.zeros((base.shape[0], 1), dtype=torch.float32, device=task.device)
        for k in range(task.num_models):
            delta = _filters(task.delta(k), self.params.filter_wise)
            total.add_(delta)
            unit = delta.div_(torch.linalg.vector_norm(delta, dim=1, keepdim=True).clamp_min_(torch.finfo().tiny))
            pair_dots.add_((unit * unit_total).sum(dim=1, keepdim=True))  # Σ_{j<k} u_j·u_k
            unit_total.add_(unit)
        n = task.num_models
        cos = pair_dots.div_(n * (n - 1) / 2).clamp_(-1.0, 1.0)
        ratio = interpolation_ratio(cos, n, self.params.clip_cos)
        merged = total.mul_(ratio / n).add_(base)
        return MergeOutput(tensor=merged.view(task.base.shape))
