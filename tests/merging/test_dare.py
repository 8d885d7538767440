"""DARE and DELLA: random drops, rescaling, edge densities."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.errors import ConfigError
from tests.merging.conftest import run


def test_density_zero_drops_everything_and_one_keeps_everything(family):
    base, ckpts = family
    for method in ("dare_linear", "dare_ties"):
        assert torch.equal(run(method, {"density": 0.0}, base, ckpts), base)  # DARE with p = 1
    torch.testing.assert_close(
        run("dare_linear", {"density": 1.0}, base, ckpts), run("task_arithmetic", {}, base, ckpts)
    )


def test_inverse_rescaling_divides_kept_entries_by_the_density(family):
    base, ckpts = family
    merged = run("dare_linear", {"density": 0.25}, base, ckpts[:1], seed=5)
    delta = ckpts[0] - base
    kept = merged != base
    torch.testing.assert_close((merged - base)[kept], delta[kept] / 0.25)
    assert 0.1 < kept.float().mean() < 0.4
    same = run("dare_linear", {"density": 0.25}, base, ckpts[:1], seed=5)
    assert torch.equal(merged, same) and not torch.equal(
        merged, run("dare_linear", {"density": 0.25}, base, ckpts[:1], seed=6)
    )


def test_della_keeps_large_entries_more_often():
    base = torch.zeros(1, 2000)
    delta = torch.linspace(0.01, 1.0, 2000).view(1, -1)
    kept = torch.zeros(2000)
    for seed in range(50):
        kept += (run("della", {"density": 0.5, "epsilon": 0.4}, base, [delta], seed=seed) != 0).float().flatten()
    assert kept[:200].mean() < 0.2 * 50 and kept[-200:].mean() > 0.8 * 50


def test_della_rejects_epsilon_outside_the_density(family):
    base, ckpts = family
    with pytest.raises(ConfigError, match=r"density ± epsilon"):
        run("della", {"density": 0.1, "epsilon": 0.2}, base, ckpts)
