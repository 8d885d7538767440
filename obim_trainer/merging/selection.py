"""Exact top-count selection: the counts are part of OBIM's contract (Algorithm 1 takes "the top n_k%").

Selecting by threshold instead of sorting keeps a merge near the speed of the disk: the
k-th largest score is found with ``torch.kthvalue`` (linear time on average), every score
above it is taken, and ties at the threshold are resolved by flat index so that exactly
``count`` positions are selected, deterministically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def apportion(numel: int, ratios: Sequence[float]) -> list[int]:
    """Exact per-model counts for shares ``ratios`` of a tensor of ``numel`` positions.

    The total is ``floor(numel·Σn_k + ½)``; each count is ``floor(n_k·numel)`` or one more,
    the extra units going to the largest fractional parts (ties: earlier model in the given
    order). This reconciles "exact counts round(n_k·numel)" with "every position owned by
    exactly one checkpoint when Σn_k = 1": with n_k = 1/3 and numel = 10 the counts are
    4, 3, 3, not 3, 3, 3.
    """
    exact = [r * numel for r in ratios]
    counts = [math.floor(x) for x in exact]
    total = min(numel, math.floor(numel * sum(ratios) + 0.5))
    by_remainder = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: max(0, total - sum(counts))]:
        counts[i] += 1
    return counts


def select_top(scores: Tensor, count: int, available: Tensor | None = None) -> Tensor:
    """Boolean mask of exactly ``count`` positions with the highest ``scores`` inside ``available``.

    Args:
        scores: Any shape, float; NaN is not allowed.
        count: How many positions to select.
        available: Boolean mask of candidate positions (``None``: all).

    Ties at the threshold go to the lowest flat index. Raises ``ValueError`` if ``count``
    exceeds the number of available positions.
    """
    flat = scores.reshape(-1)
    avail = None if available is None else available.reshape(-1)
    n_avail = flat.numel() if avail is None else int(avail.sum())
    if count < 0 or count > n_avail:
        raise ValueError(f"cannot select {count} of {n_avail} available positions")
    if count == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if count == n_avail:
        return torch.ones_like(scores, dtype=torch.bool) if avail is None else avail.view(scores.shape).clone()
    work = flat.to(torch.float32, copy=True)
    if avail is not None:
        work.masked_fill_(~avail, -math.inf)
    # the count-th largest value is the (numel - count + 1)-th smallest
    threshold = torch.kthvalue(work.cpu() if work.device.type == "mps" else work, work.numel() - count + 1).values
    mask = work > threshold
    missing = count - int(mask.sum())
    if missing > 0:
        ties = work == threshold
        if avail is not None:
            ties &= avail
        tie_rank = ties.cumsum(0, dtype=torch.int64)
        mask |= ties & (tie_rank <= missing)
    return mask.view(scores.shape)
