"""Exact top-count selection and apportioned counts: the contract of Algorithm 1's "top n_k%"."""

from __future__ import annotations

import math
import random

import pytest
import torch

from obim_trainer.merging import fused_take
from obim_trainer.merging.native_library import native_library
from obim_trainer.merging.topk import (
    RATIO_TOLERANCE,
    _native_select,
    _radix_select,
    _sampled_select,
    apportion,
    bracket_stride,
    select_top,
)


def reference_select(scores: torch.Tensor, count: int, available: torch.Tensor | None = None) -> torch.Tensor:
    """Plain reference: candidates sorted by (-score, flat index), the first ``count`` taken."""
    flat = scores.flatten().tolist()
    avail = [True] * len(flat) if available is None else available.flatten().tolist()
    ranked = sorted((i for i in range(len(flat)) if avail[i]), key=lambda i: (-flat[i], i))
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[ranked[:count]] = True
    return mask.view(scores.shape)


def ranking(scores: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
    """Reference order for large tensors: a stable sort by descending score keeps index order among ties."""
    flat = scores.flatten().clone()
    if available is not None:
        flat[~available.flatten()] = -1.0  # below every score
    return torch.sort(flat, descending=True, stable=True).indices


def first_of(ranked: torch.Tensor, count: int, shape: torch.Size) -> torch.Tensor:
    mask = torch.zeros(ranked.numel(), dtype=torch.bool)
    mask[ranked[:count]] = True
    return mask.view(shape)


@pytest.mark.parametrize("seed", range(8))
def test_matches_reference_with_many_ties_and_masks(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (7, 9), generator=gen).float()  # four distinct values: ties everywhere
    available = torch.rand(7, 9, generator=gen) > 0.3
    n_avail = int(available.sum())
    for count in range(n_avail + 1):
        got = select_top(scores, count, available)
        assert int(got.sum()) == count
        assert not bool((got & ~available).any())
        assert torch.equal(got, reference_select(scores, count, available))
    for count in range(0, scores.numel() + 1, 5):
        assert torch.equal(select_top(scores, count), reference_select(scores, count))


def test_matches_reference_on_continuous_and_special_values():
    gen = torch.Generator().manual_seed(3)
    values = torch.rand(200, generator=gen) ** 8 * 1e-3  # wide dynamic range, tiny values
    values[::17] = 0.0
    values[5] = float("inf")
    values[6] = 1e-45  # the smallest subnormal
    values[7] = -0.0  # equal to +0.0
    available = torch.rand(200, generator=gen) > 0.2
    for count in (1, 2, 3, 50, 100, int(available.sum()) - 1):
        assert torch.equal(select_top(values, count, available), reference_select(values, count, available))
    zeros = torch.tensor([0.0, -0.0, 0.0, 1.0])
    assert select_top(zeros, 3).tolist() == [True, True, False, True], "-0.0 ties with +0.0 by index"


def test_threshold_inside_a_narrow_bin_and_non_float32_scores():
    # all scores share their high 16 bits: only the low digit separates them
    gen = torch.Generator().manual_seed(1)
    narrow = 1.0 + torch.randint(0, 50, (300,), generator=gen).float() * 2**-23
    for count in (1, 7, 150, 299):
        assert torch.equal(select_top(narrow, count), reference_select(narrow, count))
    half = torch.randint(0, 6, (5, 11), generator=gen).to(torch.bfloat16)
    assert torch.equal(select_top(half, 20), reference_select(half.float(), 20))
    transposed = torch.rand(6, 9, generator=gen).t()  # not contiguous
    assert torch.equal(select_top(transposed, 13), reference_select(transposed, 13))


@pytest.mark.parametrize("distinct", [3, 1000, None])
def test_large_tensors_are_exact(distinct):
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(1_000_003, generator=gen)
    if distinct is not None:
        scores = scores.mul_(distinct).floor_()  # a few huge tie groups, or ~1000 distinct values
    available = torch.rand(scores.numel(), generator=gen) > 0.25
    ranked = ranking(scores, available)
    n_avail = int(available.sum())
    for count in (1, 333_333, n_avail - 1):
        got = select_top(scores, count, available)
        assert int(got.sum()) == count
        assert torch.equal(got, first_of(ranked, count, scores.shape))
    assert torch.equal(select_top(scores, 500_000), first_of(ranking(scores), 500_000, scores.shape))


def test_all_equal_scores_take_the_lowest_indices():
    scores = torch.zeros(100_000)
    available = torch.arange(100_000) % 3 != 0
    got = select_top(scores, 20_000, available, num_available=int(available.sum()))
    expected = torch.zeros(100_000, dtype=torch.bool)
    expected[available.nonzero().flatten()[:20_000]] = True
    assert torch.equal(got, expected)


def test_count_zero_all_and_too_many():
    scores = torch.rand(4, 5)
    available = torch.rand(4, 5) > 0.5
    n_avail = int(available.sum())
    assert not bool(select_top(scores, 0, available).any())
    every = select_top(scores, n_avail, available)
    assert torch.equal(every, available)
    every[:] = False
    assert int(available.sum()) == n_avail, "the result is a new tensor, not the caller's mask"
    assert bool(select_top(scores, 20).all())
    with pytest.raises(ValueError, match=f"cannot select {n_avail + 1} of {n_avail}"):
        select_top(scores, n_avail + 1, available)
    with pytest.raises(ValueError, match="cannot select -1"):
        select_top(scores, -1)


def test_negative_or_nan_scores_are_errors():
    with pytest.raises(ValueError, match="non-negative"):
        select_top(torch.tensor([0.5, -0.1, 0.2]), 1)
    with pytest.raises(ValueError, match="NaN"):
        select_top(torch.tensor([0.5, float("nan"), 0.2]), 1)


def largest_remainder_ok(numel: int, ratios: list[float], counts: list[int]) -> bool:
    """Every extra unit went to a remainder at least as large as any that got none (ties: earlier first)."""
    rem = [r * numel - math.floor(r * numel) for r in ratios]
    extra = [c - math.floor(r * numel) for c, r in zip(counts, ratios, strict=True)]
    return all(
        rem[i] > rem[j] or (rem[i] == rem[j] and i < j)
        for i in range(len(ratios))
        for j in range(len(ratios))
        if extra[i] == 1 and extra[j] == 0
    )


def check_apportion(numel: int, ratios: list[float]) -> None:
    counts = apportion(numel, ratios)
    total = math.floor(numel * sum(ratios) + 0.5)
    assert sum(counts) == min(numel, total), (numel, ratios, counts)
    for c, r in zip(counts, ratios, strict=True):
        assert math.floor(r * numel) <= c <= math.floor(r * numel) + 1, (numel, ratios, counts)
    assert largest_remainder_ok(numel, ratios, counts), (numel, ratios, counts)
    rounded = [math.floor(r * numel + 0.5) for r in ratios]
    if sum(rounded) == sum(counts):
        assert counts == rounded, (numel, ratios, counts)
    if math.isclose(sum(ratios), 1.0):
        assert sum(counts) == numel, "every position is owned when the shares sum to 1"


@pytest.mark.parametrize(
    "ratios",
    [[1 / 3] * 3, [0.4, 0.45, 0.1], [0.5, 0.5], [0.25] * 4, [0.2, 0.1], [1.0], [0.0, 0.7], [0.1] * 10, [1 / 7] * 7],
)
def test_apportion_properties_on_the_papers_shares(ratios):
    for numel in range(1, 51):
        check_apportion(numel, ratios)


def test_apportion_properties_on_random_shares():
    rng = random.Random(0)
    for _ in range(400):
        k = rng.randint(1, 6)
        raw = [rng.random() for _ in range(k)]
        scale = sum(raw) if rng.random() < 0.5 else sum(raw) / rng.uniform(0.1, 1.0)  # sum 1, or below 1
        ratios = [r / scale for r in raw]
        for numel in (*range(1, 51), rng.randint(51, 10**7)):
            check_apportion(numel, ratios)


def test_apportion_examples():
    assert apportion(10, [1 / 3] * 3) == [4, 3, 3]
    assert apportion(10, [0.4, 0.45, 0.1]) == [4, 5, 1]
    assert apportion(7, [0.5, 0.5]) == [4, 3]
    assert apportion(10, [0.1] * 10) == [1] * 10  # the shares sum to 0.9999999999999999
    assert apportion(0, [0.5, 0.5]) == [0, 0]


def test_apportion_scales_shares_just_above_one_and_rejects_bad_shares():
    ratios = [0.5 + RATIO_TOLERANCE / 2, 0.5]
    numel = 10**8
    counts = apportion(numel, ratios)
    assert sum(counts) == numel and counts[0] > counts[1]
    with pytest.raises(ValueError, match="sum to"):
        apportion(10, [0.6, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        apportion(10, [-0.1, 0.5])
    with pytest.raises(ValueError, match="finite"):
        apportion(10, [float("nan"), 0.5])


def topk_reference(scores: torch.Tensor, count: int, available: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.topk`` over unique int64 keys (score bits, then lower index first), so its answer is unique."""
    flat = scores.flatten().float() + 0.0  # -0.0 ranks as +0.0
    index = torch.arange(flat.numel(), dtype=torch.int64)
    keys = (flat.view(torch.int32).to(torch.int64) << 32) | ((1 << 32) - 1 - index)
    if available is not None:
        keys[~available.flatten()] = -1
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.topk(keys, count).indices] = True
    return mask.view(scores.shape)


def both_paths(
    scores: torch.Tensor, count: int, available: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The sampled-bracket result (``None`` when its bracket missed) and the radix-select result, on the same input."""
    flat = scores.flatten().float()
    free = None if available is None else available.flatten()
    n_avail = flat.numel() if free is None else int(free.sum())

    def flags(role: str) -> torch.Tensor:
        return torch.empty(flat.numel(), dtype=torch.bool)

    sampled = _sampled_select(flat, count, free, n_avail, scores.shape[-1], flags)
    radix = _radix_select(flat, count, free, flags)
    return (None if sampled is None else sampled.clone()), radix


N = 1 << 20  # large enough for the sampled path


def adversarial(name: str, gen: torch.Generator) -> torch.Tensor:
    if name == "uniform":
        return torch.rand(N, generator=gen)
    if name == "all_equal":
        return torch.full((N,), 0.25)
    if name == "mostly_zero":
        return torch.where(torch.rand(N, generator=gen) < 0.99, 0.0, torch.rand(N, generator=gen))
    if name == "few_values":
        return torch.randint(0, 3, (N,), generator=gen).float()
    if name == "sorted":
        return torch.linspace(0, 1, N)
    if name == "heavy_tail":
        return torch.randn(N, generator=gen).square() ** 4
    if name == "square_scaled_columns":  # δ² times mean(x²) per input column, as OBM scores are
        columns = torch.rand(1, 2048, generator=gen) ** 6
        return (torch.randn(N // 2048, 2048, generator=gen).square() * columns).flatten()
    raise ValueError(name)


CASES = ["uniform", "all_equal", "mostly_zero", "few_values", "sorted", "heavy_tail", "square_scaled_columns"]


@pytest.mark.parametrize("case", CASES)
def test_sampled_and_radix_paths_agree_with_a_topk_reference(case):
    gen = torch.Generator().manual_seed(CASES.index(case))
    scores = adversarial(case, gen).view(-1, 2048)
    available = torch.rand(scores.shape, generator=gen) > 0.4
    n_avail = int(available.sum())
    for count, free in ((1, None), (N // 3, None), (N // 3, available), (n_avail - 1, available), (7, available)):
        expected = topk_reference(scores, count, free)
        sampled, radix = both_paths(scores, count, free)
        assert torch.equal(radix.view(scores.shape), expected), (case, count)
        assert sampled is None or torch.equal(sampled.view(scores.shape), expected), (case, count)
        got = select_top(scores, count, free)
        assert int(got.sum()) == count
        assert torch.equal(got, expected), (case, count)


@pytest.mark.skipif(native_library() is None, reason="no C++ compiler: the fused path is off")
@pytest.mark.parametrize("case", CASES)
def test_large_cpu_scores_are_selected_by_the_native_loops_with_the_same_mask(case, monkeypatch):
    gen = torch.Generator().manual_seed(CASES.index(case))
    scores = adversarial(case, gen).view(-1, 2048)
    available = torch.rand(scores.shape, generator=gen) > 0.4
    n_avail = int(available.sum())

    def flags(role: str) -> torch.Tensor:
        return torch.empty(scores.numel(), dtype=torch.bool)

    for count, free in ((1, None), (N // 3, None), (N // 3, available), (n_avail - 1, available)):
        expected = topk_reference(scores, count, free)
        candidates = (scores.numel(), None) if free is None else (n_avail, free.flatten())
        native = _native_select(scores, count, candidates[1], candidates[0], flags)
        # huge groups of equal scores may overflow the loops' candidate room: they then leave it to torch
        assert native is not None or case in {"all_equal", "mostly_zero", "few_values"}, (case, count)
        assert native is None or torch.equal(native.view(scores.shape), expected), (case, count)
    monkeypatch.setattr(fused_take, "native_library", lambda: None)  # no library: the torch paths
    assert _native_select(scores, N // 3, None, scores.numel(), flags) is None
    assert torch.equal(select_top(scores, N // 3), topk_reference(scores, N // 3))


def test_the_sampled_path_is_taken_on_ordinary_scores_and_falls_back_when_its_sample_misleads():
    gen = torch.Generator().manual_seed(5)
    scores = torch.rand(N, generator=gen)
    sampled, _ = both_paths(scores, N // 3, None)
    assert sampled is not None, "a uniform sample brackets the threshold"
    tricky = torch.rand(N, generator=gen) + 1.0
    tricky[:: bracket_stride(N, N)] = 0.0  # the sample sees these only: make them the smallest
    count = N // 2
    sampled, _ = both_paths(tricky, count, None)
    assert sampled is None, "the sample saw only zeros; the bracket cannot hold the threshold"
    assert torch.equal(select_top(tricky, count), topk_reference(tricky, count))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_with_huge_tie_groups(dtype):
    gen = torch.Generator().manual_seed(2)
    scores = torch.rand(N, generator=gen).to(dtype)  # 16-bit: a few thousand distinct values
    available = torch.rand(N, generator=gen) > 0.5
    for count in (1000, N // 4, int(available.sum()) - 3):
        got = select_top(scores, count, available)
        assert int(got.sum()) == count
        assert torch.equal(got, topk_reference(scores, count, available))


def test_scratch_buffers_are_used_and_the_result_is_exact():
    gen = torch.Generator().manual_seed(4)
    scores = torch.rand(N, generator=gen)
    lent = {role: torch.empty(N, dtype=torch.bool) for role in ("above", "ties")}
    got = select_top(scores, N // 5, scratch=lent.__getitem__)
    assert any(got.data_ptr() == buffer.data_ptr() for buffer in lent.values()), "no full-size mask of its own"
    assert torch.equal(got, topk_reference(scores, N // 5))
