"""Task arithmetic and the family built on it (TIES, DARE, DELLA, Breadcrumbs, the ``ties_obm`` ablation).

θ_M = θ_B + λ·combine_k(w_k·sparsify_k(δ_k)), mergekit's "generalized task arithmetic": one
pipeline with two hooks. ``sparsify`` drops entries of each task vector (identity here);
``consensus`` replaces the plain sum by TIES' sign election and disjoint merge. Each method of
the family is a small subclass that fills a hook, never a copy.

Without consensus the task vectors are summed one at a time (memory: the sum and one delta).
Sign election needs every weighted delta at once, so consensus methods stack the K deltas.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import ConfigDict, Field
from torch import Tensor

from obim_trainer.merging.per_model import PerModel, per_model
from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.sign_consensus import SignTie, disjoint_merge, elect_sign
from obim_trainer.merging.task import MergeOutput, TensorTask

NORMALIZE_EPS = 1e-8
"""mergekit divides by Σ w_k only when it is at least this far from zero."""


class TaskArithmeticParams(MethodParams):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    weight: PerModel = Field(
        default=1.0, description="weight w_k of each task vector: one number or one per checkpoint"
    )
    lambda_: float = Field(default=1.0, alias="lambda", description="scale λ of the merged task vector")
    normalize: bool = Field(default=False, description="divide the weighted sum by Σ w_k")


class SignElectionParams(MethodParams):
    sign_tie: SignTie = Field(
        default="zero",
        description="where weighted deltas cancel exactly: zero keeps the base (TIES paper, sgn 0 = 0); "
        "positive elects + (mergekit)",
    )


@register_method
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    summary = "Task arithmetic (Ilharco et al. 2023): θ_B + λ·Σ_k w_k·δ_k."
    Params = TaskArithmeticParams
    consensus: ClassVar[bool] = False
    """True: TIES' sign election and disjoint merge instead of a plain sum."""

    def validate_for(self, num_models: int) -> None:
        self.weights = per_model(self.params.weight, num_models, "weight", self.name)

    def sparsify(self, task: TensorTask, k: int, delta: Tensor) -> Tensor:
        """Hook: checkpoint k's task vector after dropping entries (it owns ``delta``; identity here)."""
        return delta

    def merge(self, task: TensorTask) -> MergeOutput:
        mixed = self._sign_consensus(task) if self.consensus else self._weighted_sum(task)
        if self.params.lambda_ != 1.0:
            mixed.mul_(self.params.lambda_)
        return MergeOutput(tensor=mixed.add_(task.base))

    def _weighted_sum(self, task: TensorTask) -> Tensor:
        mixed = torch.zeros_like(task.base)
        for k, weight in enumerate(self.weights):
            mixed.add_(self.sparsify(task, k, task.delta(k)), alpha=weight)
        total = sum(self.weights)
        if self.params.normalize and abs(total) >= NORMALIZE_EPS:
            mixed.div_(total)
        return mixed

    def _sign_consensus(self, task: TensorTask) -> Tensor:
        weighted = torch.empty((task.num_models, *task.base.shape), dtype=torch.float32, device=task.device)
        for k, weight in enumerate(self.weights):
            weighted[k] = self.sparsify(task, k, task.delta(k)).mul_(weight)
        sign = elect_sign(weighted, self.params.sign_tie)
        return disjoint_merge(weighted, self.weights, sign, normalize=self.params.normalize)
