"""Weighted average of the checkpoints."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.errors import ConfigError
from tests.merging.conftest import run


def test_weighted_mean_of_the_checkpoints_without_the_base(family):
    base, ckpts = family
    torch.testing.assert_close(run("average", {}, base, ckpts), torch.stack(ckpts).mean(0))
    got = run("average", {"weight": [1.0, 0.0, 3.0]}, base, ckpts)
    torch.testing.assert_close(got, (ckpts[0] + 3 * ckpts[2]) / 4)
    torch.testing.assert_close(
        run("average", {"weight": 2.0, "normalize": False}, base, ckpts[:2]), 2 * (ckpts[0] + ckpts[1])
    )


def test_single_model_and_identical_models(family):
    base, ckpts = family
    torch.testing.assert_close(run("average", {}, base, ckpts[:1]), ckpts[0])
    torch.testing.assert_close(run("average", {}, base, [ckpts[0], ckpts[0].clone()]), ckpts[0])


def test_weights_that_sum_to_zero_cannot_be_normalized(family):
    base, ckpts = family
    with pytest.raises(ConfigError, match="sum to 0"):
        run("average", {"weight": [1.0, -1.0, 0.0]}, base, ckpts)
