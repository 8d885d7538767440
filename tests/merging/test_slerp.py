"""SLERP between the base and one checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from obim_trainer.errors import ConfigError
from tests.merging.conftest import random_family, run


def test_ends_are_the_base_and_the_checkpoint(family):
    base, ckpts = family
    torch.testing.assert_close(run("slerp", {"t": 0.0}, base, ckpts[:1]), base)
    torch.testing.assert_close(run("slerp", {"t": 1.0}, base, ckpts[:1]), ckpts[0])


def test_follows_the_great_circle_between_orthogonal_vectors():
    base, other = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    merged = run("slerp", {"t": 1 / 3}, base, [other])
    torch.testing.assert_close(merged, 2 * torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    assert merged.norm().item() == pytest.approx(2.0)  # a linear mix would shrink to 1.49


def test_collinear_and_identical_inputs_interpolate_linearly():
    base = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(run("slerp", {"t": 0.25}, base, [3 * base]), 1.5 * base)
    torch.testing.assert_close(run("slerp", {"t": 0.5}, base, [base.clone()]), base)
    zero = torch.zeros(3)
    torch.testing.assert_close(run("slerp", {"t": 0.5}, zero, [base]), 0.5 * base)  # zero vector: no NaN


def test_takes_exactly_one_checkpoint():
    base, ckpts = random_family()
    with pytest.raises(ConfigError, match="exactly 1"):
        run("slerp", {}, base, ckpts[:2])
