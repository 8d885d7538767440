"""DELLA-Merging (Deep et al. 2024): Drop (MagPrune), Elect, Fuse.

MagPrune keeps larger entries with higher probability: inside each row, the keep probability
rises linearly with the magnitude rank from density − ε to density + ε. Kept entries are
rescaled (the paper: by 1/(1 − p_i), ``rescale_mode: inverse``, the default; mergekit: L1 norm
matching, ``rescale_mode: l1``), then TIES' sign election and disjoint mean, then λ.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from obim_trainer.errors import ConfigError
from obim_trainer.merging.dare import DareTies, DareTiesParams
from obim_trainer.merging.per_model import PerModel, per_model
from obim_trainer.merging.registry import register_method
from obim_trainer.merging.sparsify import della_keep_probability
from obim_trainer.merging.task import TensorTask


class DellaParams(DareTiesParams):
    density: PerModel = Field(default=0.5, description="mean keep probability of each entry (per checkpoint)")
    epsilon: PerModel = Field(default=0.1, description="keep probabilities span density ± epsilon by magnitude rank")


@register_method
class Della(DareTies):
    name = "della"
    summary = (
        "DELLA (Deep et al. 2024): magnitude-ranked random drop (MagPrune), rescale, sign election, "
        "disjoint mean, scale by lambda."
    )
    Params = DellaParams

    def validate_for(self, num_models: int) -> None:
        super().validate_for(num_models)
        self.epsilons = per_model(self.params.epsilon, num_models, "epsilon", self.name)
        for density, epsilon in zip(self.densities, self.epsilons, strict=True):
            if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
                raise ConfigError(
                    f"della: density ± epsilon must lie in (0, 1) so that every keep probability is a "
                    f"probability, got density {density} and epsilon {epsilon}; lower epsilon"
                )

    def keep_probability(self, task: TensorTask, k: int, delta: Tensor) -> Tensor:
        return della_keep_probability(delta, self.densities[k], self.epsilons[k])
