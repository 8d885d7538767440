"""Weighted average of the checkpoints: a model soup (Wortsman et al. 2022), mergekit's ``linear``.

θ_M = Σ_k w_k·θ_k / Σ_k w_k; the base is not averaged in. Streams one checkpoint at a time.
"""

from __future__ import annotations

import torch
from pydantic import Field

from obim_trainer.errors import ConfigError
from obim_trainer.merging.per_model import PerModel, per_model
from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.task import MergeOutput, TensorTask


class AverageParams(MethodParams):
    weight: PerModel = Field(default=1.0, description="weight w_k of each checkpoint: one number or one per checkpoint")
    normalize: bool = Field(default=True, description="divide by Σ w_k (false: the plain weighted sum)")


@register_method
class Average(MergeMethod):
    name = "average"
    summary = "Weighted average of the checkpoints (model soup, Wortsman et al. 2022; mergekit's linear)."
    Params = AverageParams

    def validate_for(self, num_models: int) -> None:
        self.weights = per_model(self.params.weight, num_models, "weight", self.name)
        if self.params.normalize and sum(self.weights) == 0:
            raise ConfigError(
                f"average: the weights {self.weights} sum to 0, so they cannot be normalized; "
                "change them or set normalize: false"
            )

    def merge(self, task: TensorTask) -> MergeOutput:
        result = torch.zeros_like(task.base)
        for k, weight in enumerate(self.weights):
            result.add_(task.checkpoint(k), alpha=weight)
        if self.params.normalize:
            result.div_(sum(self.weights))
        return MergeOutput(tensor=result)
