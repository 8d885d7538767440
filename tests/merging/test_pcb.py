"""PCB-Merging against the authors' formulation written out with sorts."""

from __future__ import annotations

import pytest
import torch

from tests.merging.conftest import random_family, run


def authors_pcb(deltas: torch.Tensor, ratio: float) -> torch.Tensor:
    """The released pcb_merging on [K, n] task vectors (sort-based clamps), with 0/0 → 0 in min-max."""

    def clamp(x, min_ratio, max_ratio):
        d = x.shape[1]
        ordered = torch.sort(x, dim=1).values
        low = ordered[:, int(d * min_ratio)].unsqueeze(1)
        high = ordered[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
        return torch.clamp(x, low, high)

    def normalize(x):
        low, high = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return torch.where(high > low, (x - low) / (high - low), torch.zeros_like(x))

    n = deltas.shape[0]
    magnitude = clamp(deltas.abs(), 0.0001, 0.0001)
    score = torch.exp(n * normalize(magnitude) ** 2) * torch.tanh(deltas * deltas.sum(dim=0))
    scale = normalize(clamp(score, 1 - ratio, 0))
    return (torch.sign(deltas) * magnitude * scale).sum(0) / torch.clamp(scale.sum(0), min=1e-12)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 1.0])
def test_matches_the_authors_formulation(ratio):
    base, ckpts = random_family(shape=(30, 40), scale=0.05)
    deltas = torch.stack([(c - base).flatten() for c in ckpts])
    expected = base + 0.8 * authors_pcb(deltas, ratio).view(base.shape)
    torch.testing.assert_close(run("pcb", {"ratio": ratio, "lambda": 0.8}, base, ckpts), expected)


def test_keeps_about_ratio_of_each_task(family):
    base, ckpts = family
    changed = (run("pcb", {"ratio": 0.2}, base, ckpts) != base).float().mean()
    assert 0.15 < changed < 0.6  # the union of three top-20% sets


def test_ratio_zero_zero_deltas_single_and_identical_models_stay_finite(family):
    base, ckpts = family
    assert torch.equal(run("pcb", {"ratio": 0.0}, base, ckpts), base)
    assert torch.equal(run("pcb", {}, base, [base.clone(), base.clone()]), base)
    single = run("pcb", {"ratio": 1.0}, base, ckpts[:1])
    assert torch.isfinite(single).all()
    identical = run("pcb", {"ratio": 0.5}, base, [ckpts[0], ckpts[0].clone()])
    kept = identical != base
    kept.view(-1)[(ckpts[0] - base).abs().argmax()] = False  # the largest is clamped as an outlier
    torch.testing.assert_close(identical[kept], ckpts[0][kept])
    assert 0.4 < kept.float().mean() <= 0.5
