"""Model Stock (Jang et al. 2024): move from the base toward the checkpoints' average by
t = N·cos θ / (1 + (N − 1)·cos θ), where θ is the mean angle between task vectors.

With cos θ ≤ 0 the formula extrapolates away from the average (t ≤ 0, or unbounded near
cos θ = −1/(N−1)). ``clamp_t: true`` (default) keeps t in [0, 1], i.e. falls back to the base
when the task vectors disagree; ``clamp_t: false`` reproduces mergekit, which only maps the
singular point to the base.
"""

from __future__ import annotations

import itertools

import torch
from pydantic import Field
from torch import Tensor

from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.task import MergeOutput, TensorTask


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(default=False, description="one t per output row instead of per tensor")
    clamp_t: bool = Field(default=True, description="keep t in [0, 1] (false: mergekit's unclamped t)")


@register_method
class ModelStock(MergeMethod):
    name = "model_stock"
    summary = "Model Stock: interpolate base → checkpoint average by the angle between task vectors."
    Params = ModelStockParams
    min_models = 2

    def interpolation(self, deltas: list[Tensor]) -> Tensor:
        cosines = []
        for a, b in itertools.combinations(deltas, 2):
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        n = len(deltas)
        denominator = 1 + (n - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))
        return t.clamp(0, 1) if self.params.clamp_t else t

    def merge(self, task: TensorTask) -> MergeOutput:
        base = task.base
        if self.params.filter_wise:
            flat = base.reshape(1, -1) if base.dim() < 2 else base.reshape(base.shape[0], -1)
        else:
            flat = base.reshape(1, -1)
        deltas = [task.delta(k).reshape(flat.shape) for k in range(task.num_models)]
        t = self.interpolation(deltas)
        average_delta = torch.stack(deltas).mean(dim=0)
        return MergeOutput(tensor=(flat + t * average_delta).reshape(base.shape))
