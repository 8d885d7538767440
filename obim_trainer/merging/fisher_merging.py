"""Fisher merging of the base with the checkpoints (Matena & Raffel 2022, "Merging Models with Fisher-Weighted
Averaging").

Under a Laplace approximation each model's posterior is a Gaussian with precision its diagonal Fisher F_i,
and the merge that maximises the weighted joint posterior is the Fisher-weighted average (their eq. 2):
    θ = Σ_i λ_i·F_i⊙θ_i / Σ_i λ_i·F_i.
Here the models are the base, weight c, with its Fisher F_old measured on old-language text, and the K
checkpoints, weight 1/K each, with F_new,k on new-language text:
    θ = (c·F_old⊙θ_B + (1/K)·Σ_k F_new,k⊙θ_k) / (c·F_old + (1/K)·Σ_k F_new,k).
No relative floor is added to the Fishers (a floor of 1e-3 × the tensor's mean halved the LM head's update
in measurements); only an absolute tiny value keeps 0/0 away. Where both sides' Fishers are 0 (embedding
rows of tokens the calibration text never uses) the result is θ_B + mean_k δ_k/(1 + c), what the formula
gives when all Fishers are equal, so those rows still move toward the checkpoints.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from obim_trainer.merging.least_squares import shrink_toward_base
from obim_trainer.merging.registry import MergeMethod, MethodParams, StatisticsNeeds, register_method
from obim_trainer.merging.task import MergeOutput, TensorTask
from obim_trainer.settings.names import PER_LANGUAGE_CALIBRATION, settings_example

ZERO_FISHER = torch.finfo(torch.float32).tiny
"""Total Fisher weight at or below this counts as none (absolute, not relative: only against 0/0)."""


class FisherMergingParams(MethodParams):
    base_weight: float = Field(
        default=1.0,
        gt=0.0,
        description="weight c > 0 of the base's Fisher (old-language text) against the checkpoints' (new-language)",
    )


@register_method
class FisherMerging(MergeMethod):
    name = "fisher_merging"
    summary = (
        "Fisher merging (Matena & Raffel 2022): per parameter the Fisher-weighted average of the base (its Fisher "
        "on old-language text, weight c) and the checkpoints (their Fishers on new-language text)."
    )
    Params = FisherMergingParams

    def statistics(self) -> StatisticsNeeds:
        return StatisticsNeeds(fishers=True, per_language=True)

    def merge(self, task: TensorTask) -> MergeOutput:
        return MergeOutput(tensor=fisher_merge(task, self.params.base_weight))  # type: ignore[attr-defined]


def _fishers(task: TensorTask) -> tuple[Tensor, list[Tensor]]:
    """The Fisher diagonals as float32 on the task's device, with a clear error when missing or misshapen."""
    if task.base_fisher is None or task.checkpoint_fishers is None or len(task.checkpoint_fishers) != task.num_models:
        raise ValueError(
            f"Fisher merging of {task.name} needs the base's Fisher and one per checkpoint; run the merge with "
            f"per-language calibration data ({settings_example(PER_LANGUAGE_CALIBRATION)})"
        )
    fishers = [f.to(task.device, torch.float32) for f in (task.base_fisher, *task.checkpoint_fishers)]
    if any(f.shape != task.shape for f in fishers):
        raise ValueError(
            f"Fisher diagonals for {task.name} have shapes {[tuple(f.shape) for f in fishers]}, not the tensor's "
            f"{tuple(task.shape)}: the statistics belong to another model; recompute them"
        )
    return fishers[0], fishers[1:]


def fisher_merge(task: TensorTask, base_weight: float) -> Tensor:
    """θ = (c·F_old⊙θ_B + (1/K)Σ_k F_new,k⊙θ_k)/(c·F_old + (1/K)Σ_k F_new,k), θ_B + mean δ/(1+c) where all F = 0.

    Written on the task vectors, θ = θ_B + ((1/K)Σ_k F_new,k⊙δ_k)/(c·F_old + (1/K)Σ_k F_new,k), which is the same
    quotient without subtracting the large θ_B terms from each other (float32).
    """
    f_old, f_new = _fishers(task)
    share = 1.0 / task.num_models
    weighted = torch.zeros_like(task.base)
    mean = torch.zeros_like(task.base)
    total = f_old.mul(base_weight)
    for k, fisher in enumerate(f_new):
        delta = task.delta(k)
        mean.add_(delta, alpha=share)
        weighted.addcmul_(fisher, delta, value=share)
        total.add_(fisher, alpha=share)
    none = total <= ZERO_FISHER
    merged = weighted.div_(total.clamp_min_(ZERO_FISHER)).add_(task.base)
    return torch.where(none, shrink_toward_base(task.base, mean, base_weight), merged)
