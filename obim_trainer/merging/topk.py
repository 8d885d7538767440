"""Exact top-count selection: the counts are part of OBIM's contract (Algorithm 1 takes "the top n_k%").

Algorithm 1 sorts each checkpoint's saliencies and keeps the top n_k share. Sorting a
50M-element tensor is what would make a merge slow, and ``torch.topk`` with a large ``k``
is slow and breaks ties arbitrarily. :func:`select_top` finds the threshold without a sort
instead, takes every score above it, and gives ties at the threshold to the lowest flat
indices, so it selects exactly ``count`` positions, the same ones on every run and device, in
linear time. Large tensors bracket the threshold from a strided sample and rank only the few
percent of scores inside the bracket: on the CPU in the fused native loops of
:mod:`~obim_trainer.merging.fused_take` (two passes, where the library is built), else in a handful
of comparison passes, which torch spreads over the cores; small ones, and the rare missed bracket,
use a two-digit radix select on the float bits (two histograms). The only full-size buffers are two
bool masks, which a caller may lend (see ``scratch``) so that they are allocated once per merge, not
once per tensor.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

RATIO_TOLERANCE = 1e-6
"""Shares may sum to 1 + this (decimal input such as ten times 0.1); they are then scaled to sum to 1."""

_INF_BITS = 0x7F800000  # float32 +inf viewed as int32: the largest key of a non-negative, non-NaN score
_DIGIT = 1 << 16  # keys are split into two 16-bit digits
_SCAN_LEAF = 1 << 12  # below this many positions the n-th True is found by nonzero()
_HIGH_HALF = 1 if sys.byteorder == "little" else 0  # which int16 half of an int32 holds its high bits
_SAMPLE = 1 << 14  # scores sampled to bracket the threshold (the bracket then holds about 4% of them)
SAMPLED_MIN = 1 << 16  # below this many positions the radix select is as fast
_SORTED_MAX = 1 << 13  # up to this many positions a stable sort beats the radix select's 64k-bin histograms
_SIGMAS = 5.0  # half-width of the bracket in standard deviations of the sampled rank


def apportion(numel: int, ratios: Sequence[float]) -> list[int]:
    """Exact per-model counts for shares ``ratios`` (n_k, in the given order) of ``numel`` positions.

    The total is T = floor(numel·Σn_k + ½). Each count is floor(n_k·numel) or one more; the
    T − Σ floor(n_k·numel) extra units go to the largest fractional parts, ties to the earlier
    model in the given order (largest-remainder apportionment). This reconciles the two halves
    of the contract: counts equal round(n_k·numel) whenever those sum to T, and when Σn_k = 1
    the counts sum to ``numel``, so every position is owned by exactly one checkpoint. With
    n_k = 1/3 and numel = 10 the counts are 4, 3, 3 (rounding alone would give 3, 3, 3).

    Shares summing to at most 1 + :data:`RATIO_TOLERANCE` are scaled to sum to 1 first.

    Raises:
        ValueError: a share is negative or not finite, or the shares sum above 1 + tolerance.
    """
    if any(not math.isfinite(r) or r < 0 for r in ratios):
        raise ValueError(f"shares must be finite and non-negative, got {list(ratios)}")
    share_sum = math.fsum(ratios)
    if share_sum > 1.0 + RATIO_TOLERANCE:
        raise ValueError(f"shares {list(ratios)} sum to {share_sum:.6g} > 1")
    if share_sum > 1.0:
        ratios = [r / share_sum for r in ratios]
        share_sum = 1.0
    exact = [r * numel for r in ratios]
    counts = [math.floor(x) for x in exact]
    total = min(numel, math.floor(numel * share_sum + 0.5))
    by_remainder = sorted(range(len(counts)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _checked_scores(scores: Tensor) -> Tensor:
    """The scores flat in float32, after one pass that rejects negative and NaN scores.

    Non-negative float32 scores viewed as int32 are ordered like the floats, so the check is a
    min/max of the bits. ``-0.0`` is the one negative-looking score allowed: adding ``+0.0``
    (a copy, only then) makes it ``+0.0``.
    """
    flat = scores.reshape(-1).to(torch.float32)
    lowest, highest = torch.aminmax(flat.view(torch.int32))
    if int(lowest) >= 0 and int(highest) <= _INF_BITS:
        return flat
    if bool(torch.isnan(flat).any()) or bool(flat.min() < 0):
        raise ValueError("scores must be non-negative and not NaN (saliencies are)")
    return flat + 0.0


def _index_of_nth_true(flags: Tensor, n: int) -> int:
    """Flat index of the ``n``-th (1-based) True of a 1-D bool tensor, by bisection on counts (no big temporaries)."""
    lo, hi = 0, flags.numel()
    while hi - lo > _SCAN_LEAF:
        mid = (lo + hi) // 2
        left = int(torch.count_nonzero(flags[lo:mid]))
        if left >= n:
            hi = mid
        else:
            n -= left
            lo = mid
    return lo + int(flags[lo:hi].nonzero()[n - 1])


def _with_first_ties(above: Tensor, ties: Tensor, needed: int) -> Tensor:
    """``above`` plus the first ``needed`` (≥ 1) positions of ``ties`` in flat order: ties go to the lowest index."""
    ties[_index_of_nth_true(ties, needed) + 1 :] = False
    return above.logical_or_(ties)


def _restrict(mask: Tensor, available: Tensor | None) -> Tensor:
    return mask if available is None else mask.logical_and_(available)


def _top_digit(hist: Tensor, count: int) -> tuple[int, int]:
    """The digit value whose histogram bin holds the ``count``-th largest key, and how many lie above it."""
    from_top = hist.flip(0).cumsum(0)
    rank = int(torch.searchsorted(from_top, count))
    digit = hist.numel() - 1 - rank
    return digit, int(from_top[rank]) - int(hist[digit])


def _radix_select(flat: Tensor, count: int, available: Tensor | None, flags: Callable[[str], Tensor]) -> Tensor:
    """The top-``count`` mask by a two-digit radix select on the float bits (any score distribution).

    A histogram of the high 16 bits of the candidates' keys locates the bin that holds the
    ``count``-th largest, a histogram of the low 16 bits inside that bin locates the key (the
    bin's keys are gathered when it is small, else read through a clamped full-size pass).
    Temporaries: one int16, at most one int32 tensor, and the two bool ``flags``.
    """
    keys = flat.view(torch.int32)
    # high digit: bin 1 + (key >> 16), read from the keys' high int16 halves; bin 0 collects the unavailable
    high_bins = torch.add(keys.view(torch.int16)[_HIGH_HALF::2], 1)
    if available is not None:
        high_bins.masked_fill_(~available, 0)
    high_hist = torch.bincount(high_bins, minlength=_DIGIT // 2)
    high_hist[0] = 0
    high_bin, above_high = _top_digit(high_hist, count)
    bin_start = (high_bin - 1) * _DIGIT

    # low digit, among the keys in that bin
    if int(high_hist[high_bin]) * 16 <= flat.numel():  # a small bin: gather its keys
        low_bins = keys[high_bins == high_bin].sub_(bin_start)
        del high_bins
        low_hist = torch.bincount(low_bins, minlength=_DIGIT)
    else:  # key - bin_start + 1 is 1..65536 in the bin; clamped to 0 below it, 65537 above
        del high_bins
        low_bins = torch.sub(keys, bin_start - 1).clamp_(0, _DIGIT + 1)
        if available is not None:
            low_bins.masked_fill_(~available, 0)
        low_hist = torch.bincount(low_bins, minlength=_DIGIT + 2)[1 : _DIGIT + 1]
    del low_bins
    low, above_low = _top_digit(low_hist, count - above_high)
    threshold = bin_start + low
    ties_needed = count - above_high - above_low
    if ties_needed == int(low_hist[low]):
        return _restrict(torch.ge(keys, threshold, out=flags("above")), available)
    above = _restrict(torch.gt(keys, threshold, out=flags("above")), available)
    ties = _restrict(torch.eq(keys, threshold, out=flags("ties")), available)
    return _with_first_ties(above, ties, ties_needed)


def bracket_stride(numel: int, width: int, samples: int = _SAMPLE) -> int:
    """A sampling stride near numel / samples (at least 16) that shares no factor with the row width.

    Scores of a Linear weight are δ² scaled per input column; a stride that is a multiple of
    a divisor of the row width would sample a few columns only and bracket the threshold badly.
    """
    stride = max(16, numel // samples)
    while math.gcd(stride, max(width, 1)) != 1:
        stride += 1
    return stride


def bracket_from_sample(sample: Tensor, count: int, num_available: int) -> tuple[float, float]:
    """Scores ``(hi, lo)`` that very probably hold the ``count``-th largest of ``num_available`` between them.

    ``sample`` holds the scores of candidates at every ``stride``-th position (see
    :func:`bracket_stride`); the bracket is ±5 standard deviations of the sampled rank around the
    expected one, so the caller must still count what lies above and inside it.
    """
    size = sample.numel()
    expected = count * size / num_available
    margin = _SIGMAS * math.sqrt(expected * max(1.0 - expected / max(size, 1), 0.0)) + 8.0
    top, bottom = math.floor(expected - margin), math.ceil(expected + margin)  # 0-based ranks from the top
    hi = float(torch.kthvalue(sample, size - top).values) if 0 <= top < size else math.inf
    lo = float(torch.kthvalue(sample, size - bottom).values) if 0 <= bottom < size else -math.inf
    return hi, lo


def _native_select(
    scores: Tensor, count: int, available: Tensor | None, num_available: int, flags: Callable[[str], Tensor]
) -> Tensor | None:
    """The same mask from the fused native loops (:func:`~obim_trainer.merging.fused_take.take_top`, 3-4x
    faster than :func:`_sampled_select` on the CPU), or ``None`` where they do not apply."""
    from obim_trainer.merging.fused_take import take_top  # builds on this module

    left = take_top(scores, count, available, num_available, None, scores, flags("above").view(scores.shape))
    if left is None:
        return None
    left = left.reshape(-1)  # the candidates not taken
    return torch.logical_not(left, out=left) if available is None else left.logical_xor_(available)


def _sampled_select(
    flat: Tensor, count: int, available: Tensor | None, num_available: int, width: int, flags: Callable[[str], Tensor]
) -> Tensor | None:
    """The top-``count`` mask found through a sampled bracket, or ``None`` when the bracket missed.

    One comparison marks the candidates above the bracket (they are all taken), another the
    few inside it (a few percent), whose indices and scores are gathered; ``kthvalue`` ranks them,
    and the chosen ones, ties at the threshold in index order, are set in the mask. Full-size
    work: two comparisons, a count and a scan for the indices; the bool ``flags`` are the only
    full-size buffers.
    """
    stride = bracket_stride(flat.numel(), width)
    sample = flat[::stride] if available is None else flat[::stride][available[::stride]]
    hi, lo = bracket_from_sample(sample, count, num_available)
    above = _restrict(torch.gt(flat, hi, out=flags("above")), available)
    need = count - int(torch.count_nonzero(above))
    if need <= 0:
        return above if need == 0 else None
    inside = _restrict(torch.ge(flat, lo, out=flags("ties")), available).logical_xor_(above)
    index = inside.nonzero().squeeze(1)  # ascending flat order
    if index.numel() < need:
        return None
    between = flat[index]
    threshold = torch.kthvalue(between, between.numel() - need + 1).values  # the need-th largest
    over = between > threshold
    ties = index[between == threshold]
    above[torch.cat([index[over], ties[: need - int(torch.count_nonzero(over))]])] = True
    return above


def select_top(
    scores: Tensor,
    count: int,
    available: Tensor | None = None,
    *,
    num_available: int | None = None,
    scratch: Callable[[str], Tensor] | None = None,
) -> Tensor:
    """Boolean mask (shaped like ``scores``) of exactly ``count`` available positions with the highest scores.

    Args:
        scores: Non-negative scores of any shape, compared as float32; NaN is an error.
        count: How many positions to select.
        available: Boolean mask of the candidate positions (``None``: all).
        num_available: Number of candidates if the caller already knows it (saves a pass).
        scratch: ``scratch(role)`` returns a bool tensor shaped like ``scores`` for ``"above"``
            and ``"ties"`` (a workspace reused from tensor to tensor); the result may be one of
            them. ``None``: fresh tensors.

    Ties at the threshold go to the lowest flat index, so the result is one fixed set on every
    run and device. The threshold is found without sorting: for 65536 scores or more, by
    bracketing it between two quantiles of a strided sample and ranking only the scores inside
    the bracket (in the fused native loops on the CPU where they are built); otherwise, or when
    the bracket misses (a rare, checked event), by a radix select on the float bits. Up to 8192
    scores (norms, biases) a stable sort is quicker. All give the same mask.

    Raises:
        ValueError: ``count`` is negative or exceeds the number of candidates; a score is negative or NaN.
    """
    flat = _checked_scores(scores)
    if available is not None:
        available = available.reshape(-1)
    if num_available is None:
        num_available = flat.numel() if available is None else int(torch.count_nonzero(available))
    if not 0 <= count <= num_available:
        raise ValueError(f"cannot select {count} of {num_available} available positions")
    if count == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if count == num_available:
        everything = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        return everything if available is None else available.clone().view(scores.shape)

    def flags(role: str) -> Tensor:
        if scratch is None:
            return torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
        return scratch(role).reshape(-1)

    if flat.numel() <= _SORTED_MAX:
        return _sorted_select(flat, count, available).view(scores.shape)
    mask = None
    if flat.numel() >= SAMPLED_MIN:
        mask = _native_select(flat.view(scores.shape), count, available, num_available, flags)
        if mask is None:
            width = scores.shape[-1] if scores.dim() else 1
            mask = _sampled_select(flat, count, available, num_available, width, flags)
    if mask is None:
        mask = _radix_select(flat, count, available, flags)
    return mask.view(scores.shape)


def _sorted_select(flat: Tensor, count: int, available: Tensor | None) -> Tensor:
    """The top-``count`` mask of a small tensor by a stable sort (equal scores keep index order)."""
    keyed = flat if available is None else flat.masked_fill(~available, -1.0)  # below every score
    order = torch.sort(keyed, descending=True, stable=True).indices
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    mask[order[:count]] = True
    return mask
