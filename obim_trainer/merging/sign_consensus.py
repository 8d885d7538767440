"""TIES' sign election and disjoint mean, shared by every method with a sign consensus step."""

from __future__ import annotations

from torch import Tensor


def majority_sign(weighted_deltas: Tensor) -> Tensor:
    """Sign of the summed (weighted) deltas, ±1, ties to +1 (TIES' "elect", as mergekit votes)."""
    return (weighted_deltas.sum(dim=0) >= 0).to(weighted_deltas.dtype).mul_(2).sub_(1)


def agreement(weighted_deltas: Tensor, sign: Tensor) -> Tensor:
    """Which entries agree with the elected sign (zero deltas never do)."""
    return weighted_deltas.sign() == sign


def disjoint_mean(weighted_deltas: Tensor, weights: Tensor, keep: Tensor) -> Tensor:
    """Σ_k w_k·δ_k over agreeing entries divided by Σ_k w_k over the same entries (0 → 1)."""
    divisor = (weights * keep).sum(dim=0)
    divisor[divisor == 0] = 1
    return (weighted_deltas * keep).sum(dim=0).div_(divisor)
