"""DELLA-Merging (Deep et al. 2024): MagPrune keeps larger entries with higher probability
(density ± epsilon by magnitude rank within each row), rescales, then TIES' sign consensus."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from obim_trainer.errors import ConfigError
from obim_trainer.merging.dare import DareLinear, DareParams
from obim_trainer.merging.per_model import per_model
from obim_trainer.merging.registry import register_method
from obim_trainer.merging.sparsify import della_keep_probability
from obim_trainer.merging.task import TensorTask


class DellaParams(DareParams):
    epsilon: float | list[float] = Field(default=0.15, description="keep probabilities span density ± epsilon")
    normalize: bool = Field(default=True, description="disjoint mean over agreeing entries")


@register_method
class Della(DareLinear):
    name = "della"
    summary = "DELLA: magnitude-ranked random drop (MagPrune), rescale, sign consensus, disjoint mean."
    Params = DellaParams
    consensus = True

    def validate_for(self, num_models: int) -> None:
        super().validate_for(num_models)
        self.epsilons = per_model(self.params.epsilon, num_models, "epsilon", self.name)
        for d, e in zip(self.densities, self.epsilons, strict=True):
            if d < 1 and not (d - e > 0 and d + e < 1):
                raise ConfigError(f"della: density ± epsilon must lie in (0, 1), got density {d}, epsilon {e}")

    def keep_probability(self, task: TensorTask, k: int, delta: Tensor) -> Tensor:
        return della_keep_probability(delta, self.densities[k], self.epsilons[k])
