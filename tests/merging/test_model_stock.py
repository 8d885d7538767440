"""Model Stock: the interpolation ratio, its behaviour when task vectors disagree, and zero deltas."""

from __future__ import annotations

import itertools

import pytest
import torch

from obim_trainer.errors import ConfigError
from tests.merging.conftest import random_family, run


def pairwise_reference(base, ckpts):
    """t from the mean pairwise cosine (the paper's eq.), then base + t·(average − base)."""
    deltas = [(c - base).flatten() for c in ckpts]
    cos = torch.stack([torch.cosine_similarity(a, b, dim=0) for a, b in itertools.combinations(deltas, 2)]).mean()
    n = len(ckpts)
    t = n * cos / (1 + (n - 1) * cos)
    return base + t * (torch.stack(ckpts).mean(0) - base)


def test_matches_the_pairwise_formula():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 9, generator=gen)
    shared = torch.randn(6, 9, generator=gen)
    ckpts = [base + shared + 0.8 * torch.randn(6, 9, generator=gen) for _ in range(4)]  # cos ≈ 0.6
    torch.testing.assert_close(run("model_stock", {}, base, ckpts), pairwise_reference(base, ckpts))


def test_filter_wise_uses_one_ratio_per_row():
    base, ckpts = random_family(shape=(5, 8), scale=0.3)
    ckpts = [c + 0.5 for c in ckpts]  # positively correlated deltas
    got = run("model_stock", {"filter_wise": True}, base, ckpts)
    for row in range(5):
        torch.testing.assert_close(got[row], pairwise_reference(base[row], [c[row] for c in ckpts]))


def test_identical_task_vectors_reach_the_average_and_orthogonal_ones_keep_the_base():
    base = torch.zeros(2, 2)
    same = torch.ones(2, 2)
    torch.testing.assert_close(run("model_stock", {}, base, [same, same.clone()]), same)  # cos 1 → t 1
    a, b = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(run("model_stock", {}, base, [a, b]), base)  # cos 0 → t 0


def test_negative_cosine_keeps_the_base_unless_mergekit_behaviour_is_asked():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 0.2, 0.0, 0.0])
    b = torch.tensor([-1.0, 0.1, 0.0, 0.0])  # cos < 0
    c = torch.tensor([-0.5, -1.0, 0.0, 0.0])
    for ckpts in ([a, b], [a, b, c]):
        assert torch.equal(run("model_stock", {}, base, ckpts), base)
        unclipped = run("model_stock", {"clip_cos": False}, base, ckpts)
        torch.testing.assert_close(unclipped, pairwise_reference(base, ckpts))
        assert not torch.equal(unclipped, base)


def test_singular_point_keeps_the_base_and_zero_deltas_give_no_nan():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])  # cos = -1: 1 + (N - 1)·cos = 0
    assert torch.equal(run("model_stock", {"clip_cos": False}, base, [a, b]), base)
    base, ckpts = random_family()
    assert torch.equal(run("model_stock", {}, base, [base.clone(), base.clone()]), base)
    one_zero = run("model_stock", {}, base, [base.clone(), ckpts[0]])  # cos 0 with the zero task vector
    assert torch.isfinite(one_zero).all() and torch.equal(one_zero, base)


def test_needs_two_checkpoints(family):
    base, ckpts = family
    with pytest.raises(ConfigError, match="at least 2"):
        run("model_stock", {}, base, ckpts[:1])
