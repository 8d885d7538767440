"""TIES' sign election and disjoint merge against a plain per-entry loop."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.merging import sign_consensus
from obim_trainer.merging.native_library import native_library
from obim_trainer.merging.sign_consensus import disjoint_merge, elect_sign


def loop_reference(weighted: torch.Tensor, weights: list[float], tie: str, normalize: bool) -> torch.Tensor:
    """TIES written entry by entry: elect sgn(Σ), keep agreeing non-zero entries, divide by their weights."""
    k_models, numel = weighted.shape
    out = torch.zeros(numel)
    for i in range(numel):
        total = float(weighted[:, i].sum())
        sign = 1.0 if total > 0 else -1.0 if total < 0 else (1.0 if tie == "positive" else 0.0)
        picked = [k for k in range(k_models) if sign != 0 and float(weighted[k, i]) * sign > 0]
        value = sum(float(weighted[k, i]) for k in picked)
        divisor = sum(weights[k] for k in picked) if normalize else 1.0
        out[i] = value / divisor if divisor != 0 else value
    return out


@pytest.mark.parametrize("tie", ["zero", "positive"])
@pytest.mark.parametrize("normalize", [True, False])
def test_disjoint_merge_matches_the_loop(tie, normalize):
    gen = torch.Generator().manual_seed(0)
    weights = [1.0, 0.5, 2.0]
    deltas = torch.randint(-2, 3, (3, 60), generator=gen).float()  # many zeros and exact cancellations
    weighted = deltas * torch.tensor(weights).view(3, 1)
    got = disjoint_merge(weighted, weights, elect_sign(weighted, tie), normalize=normalize)
    torch.testing.assert_close(got, loop_reference(weighted, weights, tie, normalize))


def test_exact_cancellation_elects_no_sign_or_plus():
    weighted = torch.tensor([[1.0, -2.0, 0.0], [-1.0, 1.0, 0.0]])
    assert elect_sign(weighted, "zero").tolist() == [0.0, -1.0, 0.0]
    assert elect_sign(weighted, "positive").tolist() == [1.0, -1.0, 1.0]
    weights = [1.0, 1.0]
    assert disjoint_merge(weighted, weights, elect_sign(weighted, "zero")).tolist() == [0.0, -2.0, 0.0]
    assert disjoint_merge(weighted, weights, elect_sign(weighted, "positive")).tolist() == [1.0, -2.0, 0.0]


def test_the_vote_is_on_weighted_deltas():
    deltas = torch.tensor([[1.0], [-0.6]])
    weights = [0.5, 1.0]
    weighted = deltas * torch.tensor(weights).view(2, 1)
    assert elect_sign(weighted).item() == -1.0  # unweighted, the first checkpoint would win
    assert disjoint_merge(weighted, weights, elect_sign(weighted)).item() == pytest.approx(-0.6)


@pytest.mark.skipif(native_library() is None, reason="no C++ compiler: the fused path is off")
@pytest.mark.parametrize("tie", ["zero", "positive"])
@pytest.mark.parametrize("normalize", [True, False])
def test_the_native_pass_gives_the_torch_bits(tie, normalize, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    weights = [0.7, -0.3, 1.3, 0.7]  # a negative weight: divisors may cancel to 0 (then 1)
    shape = (300, 257)  # several units of work and a ragged last tile
    deltas = torch.randn(4, *shape, generator=gen)
    deltas[:, :, ::5] = torch.randint(-2, 3, (4, 300, 52), generator=gen).float()  # zeros and exact cancellations
    deltas[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
    weighted = deltas * torch.tensor(weights).view(4, 1, 1)
    sign = elect_sign(weighted, tie)
    native = sign_consensus._fused_disjoint_merge(weighted, weights, sign, normalize)
    assert native is not None and torch.equal(native, disjoint_merge(weighted, weights, sign, normalize=normalize))
    monkeypatch.setattr(sign_consensus, "native_library", lambda: None)
    assert sign_consensus._fused_disjoint_merge(weighted, weights, sign, normalize) is None
    torch_path = disjoint_merge(weighted, weights, sign, normalize=normalize)
    assert torch.equal(native.view(torch.int32), torch_path.view(torch.int32))  # bit for bit, NaN and -0.0 too
