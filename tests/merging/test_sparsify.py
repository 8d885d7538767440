"""Sparsification steps: exact counts, mergekit's rounding rules, seeded masks and rescaling."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.merging.sparsify import (
    apply_mask,
    della_keep_probability,
    keep_count,
    magnitude_mask,
    outlier_mask,
    random_keep_mask,
    rescale,
    share_count,
)
from tests.merging.conftest import make_task


def test_keep_count_follows_mergekit_and_survives_decimal_round_off():
    assert keep_count(100, 0.0) == 0 and keep_count(100, 1.0) == 100
    assert keep_count(100, 0.001) == 1  # a positive density keeps at least one entry
    assert keep_count(4096, 0.2) == 819  # floor, not round
    assert 0.29 * 100 < 29 and keep_count(100, 0.29) == 29
    assert share_count(100, 0.001) == 0  # Breadcrumbs' counts have no minimum of one


def test_magnitude_mask_keeps_exactly_the_largest_scores():
    scores = torch.tensor([[0.5, 3.0, 1.0], [2.0, 0.1, 4.0]])
    assert magnitude_mask(scores, 0.5).tolist() == [[False, True, False], [True, False, True]]
    assert not magnitude_mask(scores, 0.0).any() and magnitude_mask(scores, 1.0).all()


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.1), (0.9, 0.2), (0.3, 0.0), (0.0, 0.1), (0.95, 0.5)])
def test_outlier_mask_matches_a_sorted_slice(density, gamma):
    magnitude = torch.randperm(200).float()
    target, top = int(density * 200), int(gamma * 200)
    top = min(top, 200 - target)
    ascending = magnitude.argsort()
    expected = torch.zeros(200, dtype=torch.bool)
    expected[ascending[200 - top - target : 200 - top]] = True  # mergekit's slice of the ascending sort
    assert torch.equal(outlier_mask(magnitude, density, gamma), expected)
    assert outlier_mask(magnitude, 1.0, 0.3).all()  # density 1 removes nothing, outliers included


def test_random_keep_mask_is_seeded_per_tensor_and_checkpoint():
    base = torch.zeros(100, 100)
    task = make_task(base, [base, base], seed=7)
    mask = random_keep_mask(task, 0, 0.3)
    assert torch.equal(mask, random_keep_mask(make_task(base, [base, base], seed=7), 0, 0.3))
    assert not torch.equal(mask, random_keep_mask(task, 1, 0.3))
    assert not torch.equal(mask, random_keep_mask(make_task(base, [base, base], seed=8), 0, 0.3))
    assert abs(mask.float().mean().item() - 0.3) < 0.02
    assert random_keep_mask(task, 0, 1.0).all() and not random_keep_mask(task, 0, 0.0).any()


def test_della_probabilities_rise_with_the_magnitude_rank_inside_each_row():
    delta = torch.tensor([[0.3, -0.1, 0.2, -0.4, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    probability = della_keep_probability(delta, 0.5, 0.2)
    torch.testing.assert_close(probability[0], torch.tensor([0.6, 0.4, 0.5, 0.7, 0.3]))
    torch.testing.assert_close(probability[1], torch.tensor([0.7, 0.6, 0.5, 0.4, 0.3]))
    torch.testing.assert_close(della_keep_probability(delta[1], 0.5, 0.2), probability[1])  # 1-D: one row
    assert torch.equal(della_keep_probability(torch.ones(4, 1), 0.5, 0.2), torch.full((4, 1), 0.5))


def test_della_probabilities_do_not_depend_on_the_row_blocking(monkeypatch):
    delta = torch.randn(37, 11)
    whole = della_keep_probability(delta, 0.4, 0.1)
    monkeypatch.setattr("obim_trainer.merging.sparsify._RANK_CHUNK", 20)  # one row per block
    assert torch.equal(della_keep_probability(delta, 0.4, 0.1), whole)


def test_inverse_rescaling_divides_by_the_keep_probability_and_l1_matches_the_norm():
    delta = torch.tensor([1.0, -2.0, 3.0, -4.0])
    keep = torch.tensor([True, False, True, False])
    assert torch.equal(apply_mask(delta.clone(), keep, "inverse", 0.5), torch.tensor([2.0, 0.0, 6.0, 0.0]))
    probability = torch.tensor([0.25, 1.0, 0.5, 1.0])
    assert torch.equal(apply_mask(delta.clone(), keep, "inverse", probability), torch.tensor([4.0, 0.0, 6.0, 0.0]))
    l1 = apply_mask(delta.clone(), keep, "l1")
    torch.testing.assert_close(l1, torch.tensor([2.5, 0.0, 7.5, 0.0]))  # L1 10 as before
    assert torch.equal(apply_mask(delta.clone(), keep), torch.tensor([1.0, 0.0, 3.0, 0.0]))


def test_l1_rescaling_leaves_tiny_or_emptied_task_vectors_alone():
    tiny = torch.full((4,), 1e-9)
    assert torch.equal(rescale(tiny * torch.tensor([1.0, 0, 0, 0]), tiny, "l1", 1.0), torch.tensor([1e-9, 0, 0, 0]))
    emptied = torch.zeros(4)
    assert torch.equal(rescale(emptied, torch.ones(4), "l1", 1.0), emptied)
