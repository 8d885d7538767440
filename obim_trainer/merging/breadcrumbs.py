"""Model Breadcrumbs (Davari & Belilovsky 2024): drop the largest outliers (``gamma``) and the smallest
entries of each task vector, keeping ``density``; then task arithmetic (``breadcrumbs``) or TIES'
sign consensus (``breadcrumbs_ties``, mergekit's combination).

Defaults follow the WIDEN paper's grid: keep 90%, remove the top 1% (gamma ∈ {0.01, 0.05}).
``breadcrumbs_ties`` defaults to TIES' disjoint mean (``normalize: true``); mergekit defaults
to ``normalize: false``.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from obim_trainer.merging.per_model import PerModel, check_fractions, per_model
from obim_trainer.merging.registry import register_method
from obim_trainer.merging.sparsify import apply_mask, outlier_mask
from obim_trainer.merging.task import TensorTask
from obim_trainer.merging.task_arithmetic import SignElectionParams, TaskArithmetic, TaskArithmeticParams


class BreadcrumbsParams(TaskArithmeticParams):
    density: PerModel = Field(default=0.9, description="share of each task vector kept (per checkpoint)")
    gamma: PerModel = Field(default=0.01, description="share of the largest entries removed as outliers")
    rescale: bool = Field(default=False, description="scale the kept entries back to the L1 norm (mergekit)")


class BreadcrumbsTiesParams(SignElectionParams, BreadcrumbsParams):
    normalize: bool = Field(default=True, description="disjoint mean over the agreeing checkpoints (TIES)")


@register_method
class Breadcrumbs(TaskArithmetic):
    name = "breadcrumbs"
    summary = "Model Breadcrumbs: remove the largest `gamma` and the smallest entries, keep `density`, add."
    Params = BreadcrumbsParams

    def validate_for(self, num_models: int) -> None:
        super().validate_for(num_models)
        self.densities = per_model(self.params.density, num_models, "density", self.name)
        self.gammas = per_model(self.params.gamma, num_models, "gamma", self.name)
        check_fractions(self.densities, "density", self.name)
        check_fractions(self.gammas, "gamma", self.name)

    def sparsify(self, task: TensorTask, k: int, delta: Tensor) -> Tensor:
        if self.densities[k] >= 1:
            return delta
        keep = outlier_mask(delta.abs(), self.densities[k], self.gammas[k])
        return apply_mask(delta, keep, "l1" if self.params.rescale else None)


@register_method
class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    summary = "Breadcrumbs sparsification, then TIES' sign election and disjoint mean."
    Params = BreadcrumbsTiesParams
    consensus = True
