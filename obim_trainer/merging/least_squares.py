"""The closed-form least-squares merge of one linear map (RegMean, Jin et al. 2023), shared by every
RegMean variant.

For a linear map y = x·Wᵀ and models i with weights W_i, input Grams G_i = X_iᵀX_i/n_i and
weights w_i, the map that best reproduces every model's outputs on its own inputs,
argmin_W Σ_i w_i·‖X_i·Wᵀ − X_i·W_iᵀ‖²/n_i, solves W·(Σ_i w_i·G_i) = Σ_i w_i·W_i·G_i.
The sequential variant (RegMean++) has cross terms X_iᵀX̂_i on the right; callers form the
numerator and the Gram, this module only regularises and solves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from obim_trainer.merging.task import TensorTask
from obim_trainer.settings.names import setting_name


def regularize_gram(gram: Tensor, alpha: float) -> Tensor:
    """α·G + (1−α)·diag(G): RegMean's shrinkage of the off-diagonal terms (α = 1 keeps G as it is)."""
    if alpha == 1.0:
        return gram
    shrunk = gram * alpha
    shrunk.diagonal().add_(gram.diagonal(), alpha=1.0 - alpha)
    return shrunk


RIDGES = (1e-6, 1e-4, 1e-2)
"""Ridges tried in turn, as fractions of mean(diag G), when G is not numerically positive definite."""


def solve_least_squares(numerator: Tensor, gram: Tensor) -> tuple[Tensor, bool]:
    """W = N·G⁻¹ for ``numerator`` N (``[out, in]``) and a symmetric positive semi-definite ``gram`` G (``[in, in]``).

    Solved in float64 by Cholesky. Only if G is not positive definite (inputs some language never uses,
    or rounding of Grams accumulated over few texts) a ridge of 1e-6·mean(diag G) is added and the solve
    repeated, then 1e-4 and 1e-2 if that still fails. Returns the float64 solution and whether a ridge
    was needed (the merge counts those in ``obim_merge.json``).

    Raises:
        ValueError: G is not positive definite even with a ridge of 1e-2·mean(diag G) (not a Gram).
    """
    gram64 = gram.to(torch.float64)
    rhs = numerator.to(torch.float64).T  # G is symmetric: W·G = N  ⇔  G·Wᵀ = Nᵀ
    factor, info = torch.linalg.cholesky_ex(gram64)
    if info.item() == 0:
        return torch.cholesky_solve(rhs, factor).T, False
    scale = float(gram64.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    eye = torch.eye(gram64.shape[0], dtype=gram64.dtype, device=gram64.device)
    for ridge in RIDGES:
        factor, info = torch.linalg.cholesky_ex(gram64 + ridge * scale * eye)
        if info.item() == 0:
            return torch.cholesky_solve(rhs, factor).T, True
    raise ValueError(
        f"a {gram64.shape[0]}x{gram64.shape[0]} input Gram is not positive definite even with a ridge of "
        f"{RIDGES[-1]}·mean(diag): the statistics are not Grams; recompute them ({setting_name('recompute_stats')})"
    )


def shrink_toward_base(base: Tensor, mean_delta: Tensor, base_weight: float) -> Tensor:
    """θ_B + mean_k δ_k / (1 + c): what a weighted least-squares merge of the base (weight c) and the
    checkpoints (weight 1 together) gives when all their statistics are equal. Used for every parameter
    that is not a linear map's weight (embeddings, norms, biases, tied heads)."""
    return base + mean_delta / (1.0 + base_weight)


def mean_delta(task: TensorTask) -> Tensor:
    """mean_k δ_k in float32, loading one checkpoint at a time (the argument of :func:`shrink_toward_base`)."""
    total = task.delta(0)
    for k in range(1, task.num_models):
        total.add_(task.delta(k))
    return total.div_(task.num_models)
