"""Consensus task arithmetic with TALL masks (Wang et al. 2024, "Localizing Task Information for
Improved Model Merging and Compression").

The multi-task vector is task arithmetic's τ_MTL = Σ_k w_k·δ_k. Checkpoint k's TALL mask keeps
the entries where its own contribution outweighs what the others add there:
m_k = 1{|w_k·δ_k| ≥ λ·|τ_MTL − w_k·δ_k|}. Entries kept by at least ``k`` masks survive
(the consensus mask); the rest keep the base, removing "selfish" (one task) and "catastrophic"
(no task) weights. θ_M = θ_B + α·(τ_MTL ⊙ m_consensus).

``k: 0`` is task arithmetic; ``k`` above the number of checkpoints would prune everything and
is rejected. The paper tunes λ per task in [0.2, 0.6]; 0.4 is the middle. The masks are per
tensor (the paper's are over the flattened model, which is the same thing: masks are elementwise).
"""

from __future__ import annotations

import torch
from pydantic import ConfigDict, Field

from obim_trainer.errors import ConfigError
from obim_trainer.merging.per_model import PerModel, per_model
from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.task import MergeOutput, TensorTask


class ConsensusParams(MethodParams):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    k: int = Field(default=2, ge=0, description="minimum number of TALL masks that must keep an entry")
    lambda_: float = Field(default=0.4, ge=0.0, alias="lambda", description="TALL-mask threshold λ (paper: 0.2-0.6)")
    alpha: float = Field(default=1.0, description="scale α of the masked multi-task vector (task arithmetic's λ)")
    weight: PerModel = Field(
        default=1.0, description="weight w_k of each task vector: one number or one per checkpoint"
    )


@register_method
class Consensus(MergeMethod):
    name = "consensus"
    summary = "Consensus merging (Wang et al. 2024): task arithmetic kept where at least k TALL masks agree."
    Params = ConsensusParams

    def validate_for(self, num_models: int) -> None:
        self.weights = per_model(self.params.weight, num_models, "weight", self.name)
        if self.params.k > num_models:
            raise ConfigError(
                f"consensus: k={self.params.k} exceeds the {num_models} checkpoint(s), which would prune every "
                f"weight; use k <= {num_models} (2 removes selfish and catastrophic weights, 0 is task arithmetic)"
            )

    def merge(self, task: TensorTask) -> MergeOutput:
        contributions = torch.empty((task.num_models, *task.base.shape), dtype=torch.float32, device=task.device)
        for k, weight in enumerate(self.weights):
            contributions[k] = task.delta(k).mul_(weight)
        total = contributions.sum(dim=0)
        votes = torch.zeros(task.base.shape, dtype=torch.int32, device=task.device)
        for contribution in contributions:
            others = torch.sub(total, contribution).abs_().mul_(self.params.lambda_)
            votes.add_(contribution.abs() >= others)
        del contributions
        merged = total.mul_(votes >= self.params.k)
        if self.params.alpha != 1.0:
            merged.mul_(self.params.alpha)
        return MergeOutput(tensor=merged.add_(task.base))
