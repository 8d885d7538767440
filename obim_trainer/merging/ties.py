"""TIES-Merging (Yadav et al. 2023): trim each task vector to its largest entries, elect a sign per
entry, and average only the entries that agree with it (disjoint mean), then scale by λ.

Defaults are the paper's: keep the top 20% (``density: 0.2``), λ = 1, disjoint mean. Trimming
is per tensor with exact counts (``max(1, ⌊density·numel⌋)``, mergekit's rule); the paper's code
trims the flattened model at once, which a streaming merge cannot do.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from obim_trainer.merging.per_model import PerModel, check_fractions, per_model
from obim_trainer.merging.registry import register_method
from obim_trainer.merging.sparsify import apply_mask, magnitude_mask
from obim_trainer.merging.task import TensorTask
from obim_trainer.merging.task_arithmetic import SignElectionParams, TaskArithmetic, TaskArithmeticParams


class TiesParams(SignElectionParams, TaskArithmeticParams):
    density: PerModel = Field(default=0.2, description="share of each task vector kept by trimming (per checkpoint)")
    normalize: bool = Field(default=True, description="disjoint mean: divide by Σ w_k over the agreeing checkpoints")
    rescale: bool = Field(default=False, description="scale the trimmed task vector back to its L1 norm (mergekit)")


@register_method
class Ties(TaskArithmetic):
    name = "ties"
    summary = (
        "TIES-Merging (Yadav et al. 2023): trim to the top `density` by magnitude, elect signs on the "
        "weighted deltas, disjoint mean, scale by lambda."
    )
    Params = TiesParams
    consensus = True

    def validate_for(self, num_models: int) -> None:
        super().validate_for(num_models)
        self.densities = per_model(self.params.density, num_models, "density", self.name)
        check_fractions(self.densities, "density", self.name)

    def trim_scores(self, task: TensorTask, k: int, delta: Tensor) -> Tensor:
        """Hook: what trimming ranks checkpoint k's entries by (|δ| for TIES); must not modify ``delta``."""
        return delta.abs()

    def sparsify(self, task: TensorTask, k: int, delta: Tensor) -> Tensor:
        if self.densities[k] >= 1:
            return delta
        keep = magnitude_mask(self.trim_scores(task, k, delta), self.densities[k])
        return apply_mask(delta, keep, "l1" if self.params.rescale else None)
