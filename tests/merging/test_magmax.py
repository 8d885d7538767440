"""MagMax: per element the checkpoint change of largest magnitude, sign kept, times λ."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.errors import ConfigError
from obim_trainer.merging import TensorTask, build_method
from obim_trainer.merging.registry import StatisticsNeeds


def test_takes_the_largest_change_with_its_sign():
    base = torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0])
    deltas = [  # dyadic, so θ_k − θ_B is exact and ties are ties
        torch.tensor([0.125, -0.5, 0.25, 0.375, 0.0]),
        torch.tensor([-0.5, 0.25, 0.25, -0.375, 0.0]),
        torch.tensor([0.375, 0.125, -0.125, 0.125, 0.0]),
    ]
    task = TensorTask.from_tensors("w", base, [base + d for d in deltas])
    merged = build_method("magmax", {"lambda": 0.5}, num_models=3).merge(task).tensor
    chosen = torch.tensor([-0.5, -0.5, 0.25, 0.375, 0.0])  # ties (±0.375, 0.25) go to the earlier checkpoint
    torch.testing.assert_close(merged, base + 0.5 * chosen, rtol=0, atol=0)


def test_equals_an_argmax_reference_and_the_default_lambda():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(7, 9, generator=gen)
    deltas = torch.randn(4, 7, 9, generator=gen)
    task = TensorTask.from_tensors("w", base, list(base + deltas))
    pick = deltas.abs().argmax(0, keepdim=True)
    expected = base + 0.5 * (base + deltas - base).gather(0, pick)[0]
    torch.testing.assert_close(build_method("magmax", {}, num_models=4).merge(task).tensor, expected, rtol=0, atol=0)


def test_params_and_statistics():
    method = build_method("magmax", {"lambda": 0.7}, num_models=2)
    assert method.describe() == {"method": "magmax", "lambda": 0.7} and method.statistics() == StatisticsNeeds()
    assert build_method("magmax", {"lambda_": 0.7}, num_models=2).params.lambda_ == 0.7
    with pytest.raises(ConfigError, match="magmax"):
        build_method("magmax", {"lambda": "big"}, num_models=2)
