"""TIES-Merging (Yadav et al. 2023): trim each task vector to its largest entries, elect a sign per
entry, and average only the entries that agree with it (disjoint mean)."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from obim_trainer.merging.per_model import per_model
from obim_trainer.merging.registry import register_method
from obim_trainer.merging.sparsify import magnitude_mask
from obim_trainer.merging.task import TensorTask
from obim_trainer.merging.task_arithmetic import TaskArithmetic, TaskArithmeticParams


class TiesParams(TaskArithmeticParams):
    density: float | list[float] = Field(default=1.0, description="share of each task vector kept (per checkpoint)")
    normalize: bool = Field(default=True, description="disjoint mean: divide by the weights of agreeing entries")


@register_method
class Ties(TaskArithmetic):
    name = "ties"
    summary = (
        "TIES: trim to the top `density` by magnitude, elect signs on the weighted deltas (ties go positive, "
        "as in mergekit), disjoint mean, scale by lambda."
    )
    Params = TiesParams
    consensus = True

    def validate_for(self, num_models: int) -> None:
        super().validate_for(num_models)
        self.densities = per_model(self.params.density, num_models, "density", self.name)

    def trim_scores(self, task: TensorTask, k: int, delta: Tensor) -> Tensor:
        """Hook: what trimming ranks by (|δ| for TIES)."""
        return delta.abs()

    def sparsify(self, task: TensorTask, k: int, delta: Tensor) -> Tensor:
        if self.densities[k] >= 1:
            return delta
        return delta.mul_(magnitude_mask(self.trim_scores(task, k, delta.clone()), self.densities[k]))
