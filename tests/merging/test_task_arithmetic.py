"""Task arithmetic: θ_B + λ·Σ w_k·δ_k, its normalization, and the pipeline's memory contract."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.errors import ConfigError
from obim_trainer.merging import TensorTask, build_method
from tests.merging.conftest import random_family, run


def test_base_plus_scaled_weighted_sum(family):
    base, ckpts = family
    got = run("task_arithmetic", {"weight": [1.0, 0.5, 2.0], "lambda": 0.3}, base, ckpts)
    expected = base + 0.3 * sum(w * (c - base) for w, c in zip([1.0, 0.5, 2.0], ckpts, strict=True))
    torch.testing.assert_close(got, expected)


def test_normalize_divides_by_the_sum_of_weights_unless_it_is_zero(family):
    base, ckpts = family
    got = run("task_arithmetic", {"weight": [1.0, 3.0, 4.0], "normalize": True}, base, ckpts)
    expected = base + sum(w * (c - base) for w, c in zip([1.0, 3.0, 4.0], ckpts, strict=True)) / 8.0
    torch.testing.assert_close(got, expected)
    cancelling = run("task_arithmetic", {"weight": [1.0, -1.0, 0.0], "normalize": True}, base, ckpts)
    torch.testing.assert_close(cancelling, ckpts[0] - ckpts[1] + base)  # mergekit: divide by 1 then


def test_zero_deltas_single_model_and_identical_models(family):
    base, ckpts = family
    assert torch.equal(run("task_arithmetic", {}, base, [base.clone(), base.clone()]), base)
    torch.testing.assert_close(run("task_arithmetic", {}, base, ckpts[:1]), ckpts[0])
    torch.testing.assert_close(
        run("task_arithmetic", {"normalize": True}, base, [ckpts[0], ckpts[0].clone()]), ckpts[0]
    )


def test_lambda_is_spelled_as_in_mergekit():
    method = build_method("task_arithmetic", {"lambda": 0.5}, num_models=2)
    assert method.describe() == {"method": "task_arithmetic", "weight": 1.0, "lambda": 0.5, "normalize": False}
    with pytest.raises(ConfigError, match="lambda_scale"):
        build_method("task_arithmetic", {"lambda_scale": 0.5}, num_models=2)


def test_weights_must_match_the_checkpoints(family):
    base, ckpts = family
    with pytest.raises(ConfigError, match="weight has 2 value"):
        run("task_arithmetic", {"weight": [1.0, 2.0]}, base, ckpts)


def test_each_checkpoint_is_read_once_and_never_kept_whole():
    base, ckpts = random_family(k=4)
    loads: list[int] = []

    def load(k: int) -> torch.Tensor:
        loads.append(k)
        return ckpts[k].clone()

    task = TensorTask(name="w", base_float32=base, _load=load, num_models=4)
    build_method("task_arithmetic", {}, num_models=4).merge(task)
    assert loads == [0, 1, 2, 3]
