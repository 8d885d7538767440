"""DELLA: magnitude-ranked drops, parameter checks, unbiased rescaling."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.errors import ConfigError
from obim_trainer.merging import build_method
from tests.merging.conftest import make_task, random_family, run


def test_keeps_large_entries_more_often():
    base = torch.zeros(1, 2000)
    delta = torch.linspace(0.01, 1.0, 2000).view(1, -1)
    kept = torch.zeros(2000)
    for seed in range(50):
        kept += (run("della", {"density": 0.5, "epsilon": 0.4}, base, [delta], seed=seed) != 0).float().flatten()
    assert kept[:200].mean() < 0.2 * 50 and kept[-200:].mean() > 0.8 * 50


def test_inverse_rescaling_divides_each_entry_by_its_own_keep_probability():
    base = torch.zeros(1, 5)
    delta = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    merged = run("della", {"density": 0.5, "epsilon": 0.2}, base, [delta], seed=3)
    probability = torch.tensor([[0.3, 0.4, 0.5, 0.6, 0.7]])
    kept = merged != 0
    assert kept.any()
    torch.testing.assert_close(merged[kept], (delta / probability)[kept])


def test_unbiased_in_expectation():
    base, ckpts = random_family(k=1, shape=(16, 16))
    method = build_method("della", {"density": 0.5, "epsilon": 0.3}, num_models=1)
    mean = torch.stack([method.merge(make_task(base, ckpts, seed=s)).tensor for s in range(400)]).mean(0)
    assert (mean - ckpts[0]).abs().mean() < 0.1 * (ckpts[0] - base).abs().mean()


def test_density_edges_single_model_and_zero_deltas(family):
    base, ckpts = family
    assert torch.equal(run("della", {"density": 0.0}, base, ckpts), base)
    torch.testing.assert_close(run("della", {"density": 1.0}, base, ckpts), run("ties", {"density": 1.0}, base, ckpts))
    assert torch.equal(run("della", {}, base, [base.clone(), base.clone()]), base)
    assert torch.isfinite(run("della", {}, base, ckpts[:1])).all()


def test_rejects_epsilon_that_leaves_the_unit_interval(family):
    base, ckpts = family
    with pytest.raises(ConfigError, match=r"density ± epsilon must lie in \(0, 1\)"):
        run("della", {"density": 0.1, "epsilon": 0.2}, base, ckpts)
    with pytest.raises(ConfigError, match="epsilon has 2 value"):
        run("della", {"epsilon": [0.1, 0.1]}, base, ckpts)
