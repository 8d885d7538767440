"""Model Breadcrumbs (Davari & Belilovsky 2024): drop the largest outliers (gamma) and the smallest
entries of each task vector, keeping `density`; optionally with TIES' sign consensus."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from obim_trainer.merging.per_model import per_model
from obim_trainer.merging.registry import register_method
from obim_trainer.merging.sparsify import outlier_mask
from obim_trainer.merging.task import TensorTask
from obim_trainer.merging.task_arithmetic import TaskArithmetic, TaskArithmeticParams


class BreadcrumbsParams(TaskArithmeticParams):
    density: float | list[float] = Field(default=1.0, description="share of each task vector kept")
    gamma: float | list[float] = Field(default=0.01, description="share of largest entries removed as outliers")


@register_method
class Breadcrumbs(TaskArithmetic):
    name = "breadcrumbs"
    summary = "Breadcrumbs: remove the largest `gamma` and the smallest entries, keep `density`, task arithmetic."
    Params = BreadcrumbsParams

    def validate_for(self, num_models: int) -> None:
        super().validate_for(num_models)
        self.densities = per_model(self.params.density, num_models, "density", self.name)
        self.gammas = per_model(self.params.gamma, num_models, "gamma", self.name)

    def sparsify(self, task: TensorTask, k: int, delta: Tensor) -> Tensor:
        return delta.mul_(outlier_mask(delta.abs(), self.densities[k], self.gammas[k]))


@register_method
class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    summary = "Breadcrumbs sparsification with TIES' sign consensus."
    consensus = True
