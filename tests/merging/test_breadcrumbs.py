"""Model Breadcrumbs: which entries survive, and the TIES variant."""

from __future__ import annotations

import torch

from tests.merging.conftest import random_family, run


def test_removes_the_largest_outliers_and_the_smallest_entries():
    base = torch.zeros(100)
    delta = torch.arange(1, 101, dtype=torch.float32)
    merged = run("breadcrumbs", {"density": 0.5, "gamma": 0.1}, base, [delta])
    assert ((merged.nonzero().flatten() + 1).tolist()) == list(range(41, 91))  # 10 largest, 40 smallest gone
    torch.testing.assert_close(merged[40:90], delta[40:90])


def test_density_one_is_task_arithmetic_and_gamma_zero_is_magnitude_trimming(family):
    base, ckpts = family
    torch.testing.assert_close(
        run("breadcrumbs", {"density": 1.0, "gamma": 0.05}, base, ckpts), run("task_arithmetic", {}, base, ckpts)
    )
    torch.testing.assert_close(
        run("breadcrumbs_ties", {"density": 0.3, "gamma": 0.0}, base, ckpts),
        run("ties", {"density": 0.3}, base, ckpts),
    )


def test_density_zero_and_zero_deltas_give_the_base(family):
    base, ckpts = family
    assert torch.equal(run("breadcrumbs", {"density": 0.0}, base, ckpts), base)
    assert torch.equal(run("breadcrumbs_ties", {}, base, [base.clone(), base.clone()]), base)


def test_single_model_and_identical_models():
    base, ckpts = random_family(k=1, shape=(10, 10))
    single = run("breadcrumbs_ties", {"density": 0.8, "gamma": 0.1}, base, ckpts)
    assert int((single != base).sum()) == 80
    torch.testing.assert_close(run("breadcrumbs_ties", {"density": 0.8, "gamma": 0.1}, base, ckpts * 2), single)
