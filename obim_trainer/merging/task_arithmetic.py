"""Task arithmetic and the family built on it (TIES, DARE, DELLA, Breadcrumbs): sparsify each task
vector, weight it, optionally elect a sign per entry, sum, normalize, scale.

This is one pipeline with two hooks (``sparsify`` and ``consensus``), as in mergekit's
generalized task arithmetic; each method is a small subclass, never a copy.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import ConfigDict, Field
from torch import Tensor

from obim_trainer.merging.per_model import per_model
from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.sign_consensus import agreement, disjoint_mean, majority_sign
from obim_trainer.merging.task import MergeOutput, TensorTask


class TaskArithmeticParams(MethodParams):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    weight: float | list[float] = Field(
        default=1.0, description="weight of each task vector (one or one per checkpoint)"
    )
    lambda_: float = Field(default=1.0, alias="lambda", description="scale of the merged task vector")
    normalize: bool = Field(default=False, description="divide by the sum of the weights")


@register_method
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    summary = "θ_B + λ·Σ_k w_k·δ_k (Ilharco et al. 2023)."
    Params = TaskArithmeticParams
    consensus: ClassVar[bool] = False

    def validate_for(self, num_models: int) -> None:
        self.weights = per_model(self.params.weight, num_models, "weight", self.name)

    def sparsify(self, task: TensorTask, k: int, delta: Tensor) -> Tensor:
        """Hook: the task vector of checkpoint k after dropping entries (identity here)."""
        return delta

    def merge(self, task: TensorTask) -> MergeOutput:
        k_models = task.num_models
        deltas = torch.stack([self.sparsify(task, k, task.delta(k)) for k in range(k_models)])
        weights = torch.tensor(self.weights, dtype=torch.float32, device=task.device)
        weights = weights.view(k_models, *([1] * task.base.dim()))
        deltas.mul_(weights)
        if self.consensus:
            keep = agreement(deltas, majority_sign(deltas))
            mixed = disjoint_mean(deltas, weights, keep) if self.params.normalize else (deltas * keep).sum(dim=0)
        else:
            mixed = deltas.sum(dim=0)
            if self.params.normalize:
                divisor = weights.sum(dim=0)
                mixed.div_(torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor))
        return MergeOutput(tensor=mixed.mul_(self.params.lambda_).add_(task.base))
