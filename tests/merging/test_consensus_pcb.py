"""Consensus (TALL masks) and PCB."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.errors import ConfigError
from tests.merging.conftest import run


def test_consensus_k_zero_is_task_arithmetic_and_masks_need_agreement(family):
    base, ckpts = family
    torch.testing.assert_close(run("consensus", {"k": 0}, base, ckpts), run("task_arithmetic", {}, base, ckpts))
    base0 = torch.zeros(3)
    ckpts0 = [torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])]
    # entry 0: every TALL mask keeps it → kept; entries 1 and 2 are claimed by one task only → dropped
    merged = run("consensus", {"k": 2, "lambda": 0.4}, base0, ckpts0)
    assert merged.tolist() == [3.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="exceeds"):
        run("consensus", {"k": 4}, base, ckpts)


def test_pcb_keeps_about_ratio_of_each_task_and_stays_finite(family):
    base, ckpts = family
    merged = run("pcb", {"ratio": 0.2}, base, ckpts)
    assert torch.isfinite(merged).all()
    changed = (merged != base).float().mean()
    assert 0.15 < changed < 0.7  # union of the kept top-20% of three tasks
    full = run("pcb", {"ratio": 1.0}, base, [ckpts[0], ckpts[0]])
    assert torch.isfinite(full).all()
