"""DARE (Yu et al. 2024, "Language Models are Super Mario"): drop each task-vector entry with
probability p = 1 − density and rescale what is left, then add (``dare_linear``) or merge with
TIES' sign consensus (``dare_ties``).

Rescaling: the paper divides kept entries by 1 − p, which keeps every entry unbiased
(E[kept] = δ); that is ``rescale_mode: inverse``, the default here. mergekit instead scales each
tensor back to the L1 norm of its full task vector (``rescale_mode: l1``); the two agree up to
sampling noise on large tensors. ``dare_ties`` defaults to TIES' disjoint mean
(``normalize: true``); mergekit's ``dare_ties`` defaults to ``normalize: false``.

Defaults: density 0.1 (drop 90%, the paper's headline rate for SFT deltas). Continued
pre-training moves weights far more than SFT; the WIDEN paper reports DARE collapsing on such
deltas already at a drop rate of 0.3, so raise ``density`` there.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from obim_trainer.merging.per_model import PerModel, check_fractions, per_model
from obim_trainer.merging.registry import register_method
from obim_trainer.merging.sparsify import RescaleMode, apply_mask, random_keep_mask
from obim_trainer.merging.task import TensorTask
from obim_trainer.merging.task_arithmetic import SignElectionParams, TaskArithmetic, TaskArithmeticParams


class DareParams(TaskArithmeticParams):
    density: PerModel = Field(default=0.1, description="keep probability 1 − p of each entry (per checkpoint)")
    rescale: bool = Field(default=True, description="rescale the kept entries")
    rescale_mode: RescaleMode = Field(
        default="inverse", description="inverse: ÷ keep probability (paper); l1: match the L1 norm (mergekit)"
    )


class DareTiesParams(SignElectionParams, DareParams):
    normalize: bool = Field(default=True, description="disjoint mean over the agreeing checkpoints (TIES)")


@register_method
class DareLinear(TaskArithmetic):
    name = "dare_linear"
    summary = "DARE (Yu et al. 2024): random drop with rate 1 − density, rescale, task arithmetic."
    Params = DareParams

    def validate_for(self, num_models: int) -> None:
        super().validate_for(num_models)
        self.densities = per_model(self.params.density, num_models, "density", self.name)
        check_fractions(self.densities, "density", self.name)

    def keep_probability(self, task: TensorTask, k: int, delta: Tensor) -> Tensor | float:
        """Hook: probability of keeping each entry of checkpoint k (its density for DARE)."""
        return self.densities[k]

    def sparsify(self, task: TensorTask, k: int, delta: Tensor) -> Tensor:
        density = self.densities[k]
        if density >= 1:
            return delta
        if density <= 0:  # p = 1: everything dropped, nothing to rescale
            return delta.zero_()
        probability = self.keep_probability(task, k, delta)
        keep = random_keep_mask(task, k, probability)
        return apply_mask(delta, keep, self.params.rescale_mode if self.params.rescale else None, probability)


@register_method
class DareTies(DareLinear):
    name = "dare_ties"
    summary = "DARE sparsification, then TIES' sign election and disjoint mean."
    Params = DareTiesParams
    consensus = True
