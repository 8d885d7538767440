"""MagMax (Marczak et al. 2024, "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV).

Per parameter, the merged task vector keeps the change of largest magnitude among the checkpoints,
sign included (their eq. 2: τ_i = τ_{k*,i} with k* = argmax_k |τ_{k,i}|), and the result is
θ_B + λ·τ (eq. 3). Changes that many checkpoints made consistently are large and survive; small ones
are dropped rather than averaged away. Ties go to the earlier checkpoint. Default λ = 0.5, the scale
the paper uses for its merges; sweep it (``--param lambda=0.5,0.7,1``).
"""

from __future__ import annotations

import torch
from pydantic import ConfigDict, Field
from torch import Tensor

from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.task import MergeOutput, TensorTask


class MagMaxParams(MethodParams):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    lambda_: float = Field(default=0.5, alias="lambda", description="scale λ of the selected task vector")


@register_method
class MagMax(MergeMethod):
    name = "magmax"
    summary = "MagMax (Marczak et al. 2024): per parameter the checkpoint change of largest magnitude, times λ."
    Params = MagMaxParams

    def merge(self, task: TensorTask) -> MergeOutput:
        return MergeOutput(tensor=max_magnitude_delta(task).mul_(self.params.lambda_).add_(task.base))  # type: ignore[attr-defined]


def max_magnitude_delta(task: TensorTask) -> Tensor:
    """Per element the δ_k of largest |δ_k| (the earlier checkpoint on ties), one checkpoint at a time."""
    best = task.delta(0)
    best_abs = best.abs()
    for k in range(1, task.num_models):
        delta = task.delta(k)
        magnitude = delta.abs()
        larger = magnitude > best_abs
        best = torch.where(larger, delta, best)
        best_abs = torch.maximum(magnitude, best_abs)
    return best
