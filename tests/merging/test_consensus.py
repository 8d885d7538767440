"""Consensus merging with TALL masks."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.errors import ConfigError
from tests.merging.conftest import run


def test_k_zero_is_task_arithmetic(family):
    base, ckpts = family
    torch.testing.assert_close(
        run("consensus", {"k": 0, "alpha": 0.7, "weight": [1.0, 0.5, 2.0]}, base, ckpts),
        run("task_arithmetic", {"lambda": 0.7, "weight": [1.0, 0.5, 2.0]}, base, ckpts),
    )


def test_entries_need_the_agreement_of_k_tall_masks():
    base = torch.zeros(4)
    ckpts = [
        torch.tensor([1.0, 1.0, 0.0, 1.0]),
        torch.tensor([1.0, 0.0, 1.0, -0.5]),
        torch.tensor([1.0, 0.0, 0.0, 0.0]),
    ]
    # entry 0: every mask keeps it; 1 and 2: one task each (selfish); 3: |1| ≥ 0.4·|-0.5| and |-0.5| ≥ 0.4·|1|
    merged = run("consensus", {"k": 2, "lambda": 0.4}, base, ckpts)
    assert merged.tolist() == [3.0, 0.0, 0.0, 0.5]
    # λ = 0.6: 1 < 0.6·|3 - 1| on entry 0, and -0.5 no longer outweighs 0.6·|1| on entry 3
    assert run("consensus", {"k": 2, "lambda": 0.6}, base, ckpts).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert run("consensus", {"k": 1, "lambda": 0.4}, base, ckpts).tolist() == [3.0, 1.0, 1.0, 0.5]


def test_single_model_zero_deltas_and_identical_models(family):
    base, ckpts = family
    torch.testing.assert_close(run("consensus", {"k": 1}, base, ckpts[:1]), ckpts[0])
    assert torch.equal(run("consensus", {}, base, [base.clone(), base.clone()]), base)
    doubled = run("consensus", {"k": 2, "alpha": 0.5}, base, [ckpts[0], ckpts[0].clone()])
    torch.testing.assert_close(doubled, ckpts[0])  # both masks keep everything; α·2δ = δ


def test_k_above_the_checkpoints_is_rejected(family):
    base, ckpts = family
    with pytest.raises(ConfigError, match=r"k=4 exceeds the 3 checkpoint"):
        run("consensus", {"k": 4}, base, ckpts)
