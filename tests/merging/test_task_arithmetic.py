"""Task arithmetic, TIES and Breadcrumbs edge cases (the shared pipeline of task_arithmetic.py)."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.errors import ConfigError
from tests.merging.conftest import random_family, run


def test_task_arithmetic_is_base_plus_scaled_weighted_sum(family):
    base, ckpts = family
    got = run("task_arithmetic", {"weight": [1.0, 0.5, 2.0], "lambda": 0.3}, base, ckpts)
    expected = base + 0.3 * sum(w * (c - base) for w, c in zip([1.0, 0.5, 2.0], ckpts, strict=True))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "consensus", "pcb", "widen"])
def test_zero_deltas_give_the_base(method):
    base, _ = random_family()
    assert torch.equal(run(method, {}, base, [base.clone(), base.clone()]), base)


def test_ties_density_zero_is_the_base_and_density_one_is_disjoint_mean(family):
    base, ckpts = family
    assert torch.equal(run("ties", {"density": 0.0}, base, ckpts), base)
    deltas = torch.stack([c - base for c in ckpts])
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = deltas.sign() == sign
    expected = base + (deltas * agree).sum(0) / agree.sum(0).clamp_min(1)
    torch.testing.assert_close(run("ties", {"density": 1.0}, base, ckpts), expected)


def test_ties_sign_ties_go_positive():
    base = torch.zeros(4)
    ckpts = [torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([-1.0, 1.0, -2.0, 0.0])]
    merged = run("ties", {}, base, ckpts)
    # sums are exactly 0: the positive side wins; zero deltas never vote
    assert torch.equal(merged, torch.tensor([1.0, 1.0, 2.0, 0.0]))


def test_single_model_and_two_identical_models(family):
    base, ckpts = family
    for method in ("ties", "task_arithmetic", "breadcrumbs_ties"):
        assert torch.allclose(run(method, {}, base, ckpts[:1]), ckpts[0])
    assert torch.allclose(run("ties", {"density": 1.0}, base, [ckpts[0], ckpts[0]]), ckpts[0])
    assert torch.allclose(run("average", {}, base, [ckpts[0], ckpts[0]]), ckpts[0])


def test_breadcrumbs_removes_outliers_and_small_entries():
    base = torch.zeros(100)
    delta = torch.arange(1, 101, dtype=torch.float32)
    merged = run("breadcrumbs", {"density": 0.5, "gamma": 0.1}, base, [delta])
    kept = merged.nonzero().flatten() + 1
    assert kept.tolist() == list(range(41, 91))  # the 10 largest and the 40 smallest are gone


def test_per_model_lists_must_match_k(family):
    base, ckpts = family
    with pytest.raises(ConfigError, match="weight has 2 value"):
        run("task_arithmetic", {"weight": [1.0, 2.0]}, base, ckpts)
    with pytest.raises(ConfigError, match="density has 4 value"):
        run("ties", {"density": [0.1] * 4}, base, ckpts)
