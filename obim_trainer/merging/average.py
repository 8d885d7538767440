"""Weighted average of the checkpoints (model soup; mergekit's ``linear``). The base is not averaged in."""

from __future__ import annotations

import torch
from pydantic import Field

from obim_trainer.merging.per_model import per_model
from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.task import MergeOutput, TensorTask


class AverageParams(MethodParams):
    weight: float | list[float] = Field(default=1.0, description="weight of each checkpoint")
    normalize: bool = Field(default=True, description="divide by the sum of the weights")


@register_method
class Average(MergeMethod):
    name = "average"
    summary = "Weighted average of the checkpoints (model soup, Wortsman et al. 2022)."
    Params = AverageParams

    def validate_for(self, num_models: int) -> None:
        self.weights = per_model(self.params.weight, num_models, "weight", self.name)

    def merge(self, task: TensorTask) -> MergeOutput:
        result = torch.zeros_like(task.base)
        for k, w in enumerate(self.weights):
            result.add_(task.checkpoint(k), alpha=w)
        if self.params.normalize:
            result.div_(sum(self.weights) or 1.0)
        return MergeOutput(tensor=result)
