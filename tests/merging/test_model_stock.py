"""Model Stock: the interpolation ratio and its behaviour when task vectors disagree."""

from __future__ import annotations

import pytest
import torch

from tests.merging.conftest import run


def test_orthogonal_like_deltas_stay_near_base_and_identical_ones_reach_the_average():
    base = torch.zeros(2, 2)
    same = torch.ones(2, 2)
    torch.testing.assert_close(run("model_stock", {}, base, [same, same]), same)  # cos 1 → t 1
    a, b = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(run("model_stock", {}, base, [a, b]), base)  # cos 0 → t 0


def test_negative_cosine_is_clamped_to_the_base_unless_asked():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 0.2, 0.0, 0.0])
    b = torch.tensor([-1.0, 0.1, 0.0, 0.0])  # cos < 0
    assert torch.equal(run("model_stock", {}, base, [a, b]), base)
    unclamped = run("model_stock", {"clamp_t": False}, base, [a, b])
    assert not torch.equal(unclamped, base) and torch.isfinite(unclamped).all()


def test_needs_two_checkpoints(family):
    base, ckpts = family
    from obim_trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 2"):
        run("model_stock", {}, base, ckpts[:1])
