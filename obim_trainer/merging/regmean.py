"""Forgetting-aware RegMean: the least-squares merge of each linear map (Jin et al. 2023, "Dataless
Knowledge Fusion by Merging Weights of Language Models"), with the base as one of the models.

For a linear map y = x·Wᵀ, RegMean's merged weight minimises the distance between the merged
layer's outputs and every model's own outputs on that model's inputs (§3.1, eq. 1–2):
    argmin_W Σ_i w_i·‖X_i·Wᵀ − X_i·W_iᵀ‖²/n_i,   solved by   W* = (Σ_i w_i·W_i·G_i)·(Σ_i w_i·G_i)⁻¹
with the input Grams G_i = X_iᵀX_i/n_i. Here the models are the base (weight c, its Gram measured on
old-language text) and the K checkpoints (weight 1/K each, their Grams on new-language text):
    W* = (c·W_B·G_B + (1/K)·Σ_k W_k·G_k) · (c·G_B + (1/K)·Σ_k G_k)⁻¹,
the map that reproduces the base on old-language inputs and the checkpoints on new-language ones;
c trades one against the other. Each Gram is first shrunk toward its diagonal,
G ← α·G + (1−α)·diag(G) (RegMean's eq. 4; α = 1 keeps the full covariance, which measured best here).

Everything that is not a linear map's weight with Grams — embeddings, norms, biases, an LM head tied to
the embeddings, an MoE expert one side's text never reaches — gets θ_B + mean_k δ_k/(1 + c). That is what
the formula above gives when every model's statistics are equal (G_B = G_k = G):
W* = (c·W_B + mean_k W_k)·G·((c + 1)·G)⁻¹ = θ_B + mean_k δ_k/(1+c).
Embedding rows of tokens the calibration text never uses thus still move toward the checkpoints.

``sequential: true`` (the default, RegMean++) is a model-level pipeline: it merges the linear maps in
forward order with inputs taken from the partially merged model, and dispatches on this flag. This
module's per-tensor :meth:`RegMean.merge` is the closed form on fixed Grams, i.e. ``sequential: false``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from obim_trainer.merging.least_squares import mean_delta, regularize_gram, shrink_toward_base, solve_least_squares
from obim_trainer.merging.registry import MergeMethod, MethodParams, StatisticsNeeds, register_method
from obim_trainer.merging.task import MergeOutput, ParamKind, TensorTask

RIDGED_NOTE = "regmean_ridged_tensors"
"""Key of :attr:`MergeOutput.notes`: linear maps whose Gram needed a ridge (inputs a language never uses)."""


class RegMeanParams(MethodParams):
    base_weight: float = Field(
        default=1.0,
        gt=0.0,
        description="weight c > 0 of the base's outputs on old-language text against the checkpoints' on new text "
        "(larger keeps more of the base)",
    )
    alpha: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="shrink each Gram to α·G + (1−α)·diag(G), α in [0, 1] (1: full covariance; the paper used 0.9)",
    )
    statistics: Literal["per_language", "mixed"] = Field(
        default="per_language",
        description="per_language: base Grams on old-language text, checkpoints' on new-language text; "
        "mixed: every model's Grams on all calibration text (one calibration file)",
    )
    sequential: bool = Field(
        default=True,
        description="RegMean++: merge linear maps in forward order on the partially merged model's inputs "
        "(model-level pipeline); false: each map on the original models' Grams",
    )


@register_method
class RegMean(MergeMethod):
    name = "regmean"
    summary = (
        "Forgetting-aware RegMean (Jin et al. 2023): per linear map the least-squares weight that reproduces the base "
        "on old-language inputs and the checkpoints on new-language ones; other parameters θ_B + mean δ/(1+c)."
    )
    Params = RegMeanParams

    @property
    def _params(self) -> RegMeanParams:
        return self.params  # type: ignore[return-value]

    def statistics(self) -> StatisticsNeeds:
        per_language = self._params.statistics == "per_language"
        if self._params.sequential:
            return StatisticsNeeds(sequential=True, per_language=per_language)
        return StatisticsNeeds(grams=True, per_language=per_language)

    def describe_tensor(self, block_index: int | None) -> str:
        return f"linear maps: least squares on input Grams; others: θ_B + mean δ/(1+{self._params.base_weight:g})"

    def merge(self, task: TensorTask) -> MergeOutput:
        """The non-sequential solve (``sequential: false``) of one tensor."""
        c = self._params.base_weight
        if task.kind is not ParamKind.LINEAR or task.base_gram is None or task.checkpoint_grams is None:
            return MergeOutput(tensor=shrink_toward_base(task.base, mean_delta(task), c))
        if _unreached(task.base_gram, task.checkpoint_grams):
            return MergeOutput(tensor=shrink_toward_base(task.base, mean_delta(task), c))
        merged, ridged = regmean_linear(task, c, self._params.alpha)
        return MergeOutput(tensor=merged, notes={RIDGED_NOTE: int(ridged)})


def _unreached(base_gram: Tensor, checkpoint_grams: Sequence[Tensor]) -> bool:
    """Whether one side's Grams are all zero: the map never ran on that side's text (an MoE expert no token of
    it was routed to; the statistics pass warned and counted them). With no evidence on one side the solve
    would copy the other; such a map gets θ_B + mean δ/(1+c), as in the sequential merge."""
    return not bool(base_gram.any()) or not any(bool(gram.any()) for gram in checkpoint_grams)


def _as_out_in(weight: Tensor, in_axis: int) -> Tensor:
    """The weight as ``[out, in]`` (y = x·Wᵀ): Conv1D stores ``[in, out]``."""
    if weight.dim() != 2 or in_axis not in (0, 1):
        raise ValueError(f"a linear map's weight must be 2-D with input axis 0 or 1, got {tuple(weight.shape)}")
    return weight if in_axis == 1 else weight.T


def regmean_linear(task: TensorTask, base_weight: float, alpha: float) -> tuple[Tensor, bool]:
    """W* = (c·W_B·G_B + (1/K)Σ_k W_k·G_k)·(c·G_B + (1/K)Σ_k G_k)⁻¹ for one linear map, in float64.

    Solved on the task vectors: with G = c·G_B + (1/K)Σ_k G_k the numerator is W_B·G + (1/K)Σ_k δ_k·G_k,
    so W* = W_B + ((1/K)Σ_k δ_k·G_k)·G⁻¹, the same map without the large W_B terms in the solve. Where G
    is singular (input features no text uses) the ridge then shrinks the update toward 0, i.e. W* keeps
    the base there, instead of shrinking the weights themselves toward 0.
    Returns the merged weight in float32 in the tensor's own layout and whether the solve needed a ridge.
    """
    grams = task.checkpoint_grams
    assert task.base_gram is not None and grams is not None
    _check_grams(task, grams)
    share = 1.0 / task.num_models
    total = regularize_gram(task.base_gram.to(task.device, torch.float64), alpha).mul(base_weight)
    numerator: Tensor | None = None
    for k in range(task.num_models):
        gram = regularize_gram(grams[k].to(task.device, torch.float64), alpha)
        term = _as_out_in(task.delta(k), task.in_axis).to(torch.float64) @ gram
        numerator = term.mul_(share) if numerator is None else numerator.add_(term, alpha=share)
        total.add_(gram, alpha=share)
    assert numerator is not None
    update, ridged = solve_least_squares(numerator, total)
    merged = _as_out_in(task.base, task.in_axis).to(torch.float64).add_(update).to(torch.float32)
    return (merged if task.in_axis == 1 else merged.T).contiguous(), ridged


def _check_grams(task: TensorTask, grams: Sequence[Tensor]) -> None:
    """A clear error when the Grams do not belong to this tensor (another model's statistics)."""
    width = task.shape[task.in_axis]
    shapes = [tuple(g.shape) for g in (task.base_gram, *grams) if g is not None]
    if len(grams) != task.num_models or any(s != (width, width) for s in shapes):
        raise ValueError(
            f"input Grams for {task.name} have shapes {shapes} for {task.num_models} checkpoint(s), but the weight "
            f"{tuple(task.shape)} reads {width} input features: the statistics belong to another model; recompute them"
        )
