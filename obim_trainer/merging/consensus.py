"""Consensus task arithmetic with TALL masks (Wang et al. 2024, "Localizing Task Information for
Improved Model Merging and Compression").

Each checkpoint's TALL mask keeps the entries where its task vector dominates the rest of the
multi-task vector: m_k = |δ_k| ≥ λ·|δ_MTL − δ_k| with δ_MTL = Σ_k δ_k. Entries claimed by at least
``k`` masks are kept (consensus); elsewhere the merge keeps the base. θ = θ_B + w·Σ_k δ_k ⊙ m_cons.
"""

from __future__ import annotations

import torch
from pydantic import ConfigDict, Field

from obim_trainer.errors import ConfigError
from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.task import MergeOutput, TensorTask


class ConsensusParams(MethodParams):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    k: int = Field(default=2, ge=0, description="minimum number of checkpoints whose TALL masks keep an entry")
    lambda_: float = Field(default=0.4, alias="lambda", description="TALL-mask threshold (paper's range 0.2-0.6)")
    weight: float = Field(default=1.0, description="scale of the merged task vector")


@register_method
class Consensus(MergeMethod):
    name = "consensus"
    summary = "Consensus task arithmetic: keep entries that at least k TALL masks agree on."
    Params = ConsensusParams

    def validate_for(self, num_models: int) -> None:
        if self.params.k > num_models:
            raise ConfigError(f"consensus: k={self.params.k} exceeds the {num_models} checkpoints; lower k")

    def merge(self, task: TensorTask) -> MergeOutput:
        deltas = torch.stack([task.delta(k) for k in range(task.num_models)])
        total = deltas.sum(dim=0)
        votes = (deltas.abs() >= self.params.lambda_ * (total - deltas).abs()).sum(dim=0)
        keep = votes >= self.params.k
        return MergeOutput(tensor=task.base + self.params.weight * total * keep)
