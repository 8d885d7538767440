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


def _float_keys(values: Tensor) -> Tensor:
    """int32 keys that sort like the float32 values; a view, not a copy, when no value is negative."""
    bits = values.to(torch.float32).view(torch.int32)
    if bool(values.min() >= 0):
        return bits
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # flip magnitude bits of negative floats


def select_top(
    scores: Tensor,
    count: int,
    available: Tensor | None = None,
    *,
    exclude: Tensor | None = None,
    num_available: int | None = None,
) -> Tensor:
    """Boolean mask of exactly ``count`` positions with the highest ``scores`` among the candidates.

    Args:
        scores: Any shape, float; NaN is not allowed.
        count: How many positions to select.
        available: Boolean mask of candidate positions (``None``: all).
        exclude: Boolean mask of positions that are not candidates (the complement of
            ``available``; saves a full-size temporary when the caller holds it).
        num_available: Number of candidates if the caller knows it (saves a pass).

    A radix select on the float bits: one histogram of the top 16 bits finds the bucket that
    holds the threshold, everything above it is taken, and only that bucket's members are
    sorted. Ties at the threshold go to the lowest flat index. Raises ``ValueError`` if
    ``count`` exceeds the number of candidates.
    """
    flat = scores.reshape(-1)
    if available is not None:
        exclude = ~available.reshape(-1)
    elif exclude is not None:
        exclude = exclude.reshape(-1)
    if num_available is None:
        num_available = flat.numel() - (0 if exclude is None else int(exclude.sum()))
    if count < 0 or count > num_available:
        raise ValueError(f"cannot select {count} of {num_available} available positions")
    if count == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if count == num_available:
        return torch.ones_like(scores, dtype=torch.bool) if exclude is None else (~exclude).view(scores.shape)
    keys = _float_keys(flat)
    # bucket 0 holds the excluded positions; buckets 1..65536 the top 16 bits of the keys
    buckets = torch.bitwise_right_shift(keys, 16).add_((1 << 15) + 1)
    if exclude is not None:
        buckets.masked_fill_(exclude, 0)
    hist = torch.bincount(buckets, minlength=(1 << 16) + 1)
    from_top = hist.flip(0).cumsum(0)
    bucket = hist.numel() - 1 - int(torch.searchsorted(from_top, count))
    above = int(from_top[hist.numel() - 1 - bucket]) - int(hist[bucket])
    mask = buckets > bucket
    members = (buckets == bucket).nonzero().squeeze(1)
    del buckets
    order = torch.sort(keys[members], descending=True, stable=True).indices
    mask[members[order[: count - above]]] = True
    return mask.view(scores.shape)
