"""DARE (Yu et al. 2024): drop each task-vector entry with probability 1 − density and rescale the rest.

The paper rescales by 1/density (unbiased in expectation): ``rescale_mode: inverse``, the default
here. mergekit matches the L1 norm of the full task vector instead: ``rescale_mode: l1``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from obim_trainer.merging.per_model import per_model
from obim_trainer.merging.registry import register_method
from obim_trainer.merging.sparsify import bernoulli_mask, rescale
from obim_trainer.merging.task import TensorTask
from obim_trainer.merging.task_arithmetic import TaskArithmetic, TaskArithmeticParams


class DareParams(TaskArithmeticParams):
    density: float | list[float] = Field(default=1.0, description="keep probability 1 − p (per checkpoint)")
    rescale: bool = Field(default=True, description="rescale kept entries")
    rescale_mode: Literal["inverse", "l1"] = Field(
        default="inverse", description="inverse: ÷ keep probability (paper); l1: match the L1 norm (mergekit)"
    )


@register_method
class DareLinear(TaskArithmetic):
    name = "dare_linear"
    summary = "DARE: random drop with rescaling, then task arithmetic."
    Params = DareParams

    def validate_for(self, num_models: int) -> None:
        super().validate_for(num_models)
        self.densities = per_model(self.params.density, num_models, "density", self.name)

    def keep_probability(self, task: TensorTask, k: int, delta: Tensor) -> Tensor | float:
        """Hook: probability of keeping each entry (the density for DARE)."""
        return self.densities[k]

    def sparsify(self, task: TensorTask, k: int, delta: Tensor) -> Tensor:
        if self.densities[k] >= 1:
            return delta
        if self.densities[k] <= 0:
            return delta.zero_()
        probability = self.keep_probability(task, k, delta)
        kept = delta * bernoulli_mask(probability, delta, task.generator(self.name, k))
        return rescale(kept, delta, self.params.rescale_mode, probability) if self.params.rescale else kept


@register_method
class DareTies(DareLinear):
    name = "dare_ties"
    summary = "DARE sparsification with TIES' sign consensus."
    consensus = True
