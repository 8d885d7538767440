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


def regularize_gram(gram: Tensor, alpha: float) -> Tensor:
    """α·G + (1−α)·diag(G): RegMean's shrinkage of the off-diagonal terms (α = 1 keeps G as it is)."""
    if alpha == 1.0:
        return gram
    shrunk = gram * alpha
    shrunk.diagonal().add_(gram.diagonal(), alpha=1.0 - alpha)
    return shrunk


def solve_least_squares(numerator: Tensor, gram: Tensor) -> tuple[Tensor, bool]:
    """W = N·G⁻¹ for ``numerator`` N (``[out, in]``) and a symmetric positive semi-definite ``gram`` G (``[in, in]``).

    Solved in float64 by Cholesky. Only if G is not positive definite (inputs some language never uses)
    a ridge of 1e-6·mean(diag G) is added and the solve repeated. Returns the float64 solution and
    whether the ridge was needed (the merge counts those in ``obim_merge.json``).
    """
    gram64 = gram.to(torch.float64)
    rhs = numerator.to(torch.float64).T  # G is symmetric: W·G = N  ⇔  G·Wᵀ = Nᵀ
    factor, info = torch.linalg.cholesky_ex(gram64)
    ridged = bool(info.item() != 0)
    if ridged:
        ridge = 1e-6 * float(gram64.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
        eye = torch.eye(gram64.shape[0], dtype=gram64.dtype, device=gram64.device)
        factor = torch.linalg.cholesky(gram64 + ridge * eye)
    return torch.cholesky_solve(rhs, factor).T, ridged


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
