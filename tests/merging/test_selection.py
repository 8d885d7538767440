"""Exact top-count selection and apportioned counts (the contract of Algorithm 1)."""

from __future__ import annotations

import math

import pytest
import torch

from obim_trainer.merging.selection import apportion, select_top


def reference_select(scores: torch.Tensor, count: int, available: torch.Tensor | None) -> torch.Tensor:
    """Plain reference: candidates sorted by (-score, flat index), first ``count`` taken."""
    flat = scores.flatten().tolist()
    avail = [True] * len(flat) if available is None else available.flatten().tolist()
    ranked = sorted((i for i in range(len(flat)) if avail[i]), key=lambda i: (-flat[i], i))
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[ranked[:count]] = True
    return mask.view(scores.shape)


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_with_many_ties_and_masks(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (7, 9), generator=gen).float()  # heavy ties
    available = torch.rand(7, 9, generator=gen) > 0.3
    n_avail = int(available.sum())
    for count in {0, 1, n_avail // 3, n_avail // 2, n_avail - 1, n_avail}:
        got = select_top(scores, count, available)
        assert int(got.sum()) == count
        assert not bool((got & ~available).any())
        assert torch.equal(got, reference_select(scores, count, available))
    assert torch.equal(select_top(scores, 5), reference_select(scores, 5, None))


def test_large_tensor_is_exact_and_takes_the_highest():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(1_000_003, generator=gen).mul_(1000).floor_()  # ~1000 distinct values
    count = 333_333
    got = select_top(scores, count)
    assert int(got.sum()) == count
    assert scores[got].min() >= scores[~got].max()
    ties = scores == scores[got].min()
    picked_ties = torch.nonzero(got & ties).flatten()
    unpicked_ties = torch.nonzero(~got & ties).flatten()
    assert picked_ties.max() < unpicked_ties.min(), "ties go to the lowest flat index"


def test_too_many_or_negative_is_an_error():
    with pytest.raises(ValueError, match="cannot select 5 of 4"):
        select_top(torch.rand(4), 5)
    with pytest.raises(ValueError):
        select_top(torch.rand(4), -1)


@pytest.mark.parametrize(
    "ratios", [[1 / 3] * 3, [0.4, 0.45, 0.1], [0.5, 0.5], [0.25] * 4, [0.2, 0.1], [1.0], [0.0, 0.7]]
)
def test_apportion_is_floor_or_ceil_and_sums_to_the_rounded_total(ratios):
    for numel in range(1, 60):
        counts = apportion(numel, ratios)
        assert sum(counts) == min(numel, math.floor(numel * sum(ratios) + 0.5))
        for c, r in zip(counts, ratios, strict=True):
            assert math.floor(r * numel) <= c <= math.floor(r * numel) + 1
        if math.isclose(sum(ratios), 1.0):
            assert sum(counts) == numel, "every position is owned when the shares sum to 1"


def test_apportion_gives_extra_units_to_largest_remainders_then_earlier_models():
    assert apportion(10, [1 / 3] * 3) == [4, 3, 3]
    assert apportion(10, [0.4, 0.45, 0.1]) == [4, 5, 1]
    assert apportion(7, [0.5, 0.5]) == [4, 3]
