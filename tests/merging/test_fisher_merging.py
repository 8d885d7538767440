"""Fisher merging against a float64 reference, zero-Fisher positions included."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.errors import ConfigError
from obim_trainer.merging import ParamKind, TensorTask, build_method
from obim_trainer.merging.registry import StatisticsNeeds

K = 3
SHAPE = (6, 8)


def family(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=gen)
    ckpts = [base + 0.2 * torch.randn(SHAPE, generator=gen) for _ in range(K)]
    fishers = [torch.rand(SHAPE, generator=gen) ** 3 for _ in range(K + 1)]  # spread over orders of magnitude
    fishers[0][0] = 0.0  # row 0: no old-language Fisher
    for f in fishers[1:]:
        f[0, :4] = 0.0  # row 0, first half: no Fisher at all
        f[1] = 0.0  # row 1: no new-language Fisher (only the base's)
    return base, ckpts, fishers


def reference(base, ckpts, fishers, c):
    theta = [base.double(), *(w.double() for w in ckpts)]
    f = [x.double() for x in fishers]
    weights = [c] + [1.0 / K] * K
    num = sum(w * fi * t for w, fi, t in zip(weights, f, theta, strict=True))
    den = sum(w * fi for w, fi in zip(weights, f, strict=True))
    fallback = theta[0] + sum(t - theta[0] for t in theta[1:]) / K / (1 + c)
    return torch.where(den == 0, fallback, num / torch.where(den == 0, 1.0, den))


def merge(base, ckpts, fishers, params, kind=ParamKind.OTHER):
    t = TensorTask.from_tensors("w", base, ckpts, kind=kind, base_fisher=fishers[0], checkpoint_fishers=fishers[1:])
    return build_method("fisher_merging", params, num_models=K).merge(t).tensor


@pytest.mark.parametrize("c", [0.3, 1.0, 3.0])
def test_equals_the_float64_reference(c):
    base, ckpts, fishers = family()
    merged = merge(base, ckpts, fishers, {"base_weight": c})
    torch.testing.assert_close(merged.double(), reference(base, ckpts, fishers, c), rtol=0, atol=1e-6)
    # where only the base has Fisher, the base is kept exactly
    torch.testing.assert_close(merged[1], base[1], rtol=0, atol=0)
    # where nobody has Fisher: the shrink rule, not the base
    expected = base[0, :4] + (torch.stack(ckpts)[:, 0, :4] - base[0, :4]).mean(0) / (1 + c)
    torch.testing.assert_close(merged[0, :4], expected, rtol=0, atol=1e-6)
    assert not torch.equal(merged[0, :4], base[0, :4])
    # where only the checkpoints have Fisher (row 0, second half): their Fisher-weighted mean, no base at all
    f = torch.stack(fishers[1:])[:, 0, 4:]
    only_new = (f * torch.stack(ckpts)[:, 0, 4:]).sum(0) / f.sum(0)
    torch.testing.assert_close(merged[0, 4:], only_new, rtol=1e-5, atol=1e-6)


def test_tiny_fishers_are_not_floored():
    """A relative floor would pull a parameter with a tiny Fisher toward the base; an absolute one does not."""
    base, ckpts, _ = family(1)
    fishers = [torch.full(SHAPE, 1e-12)] + [torch.full(SHAPE, 1e-12) for _ in range(K)]
    merged = merge(base, ckpts, fishers, {})
    torch.testing.assert_close(merged, (base + torch.stack(ckpts).mean(0)) / 2, rtol=0, atol=1e-6)


def test_needs_fishers_per_language_and_names_missing_ones():
    assert build_method("fisher_merging", {}, num_models=2).statistics() == StatisticsNeeds(
        fishers=True, per_language=True
    )
    base, ckpts, _ = family(2)
    t = TensorTask.from_tensors("model.norm.weight", base, ckpts)
    with pytest.raises(ValueError, match=r"model\.norm\.weight needs the base's Fisher"):
        build_method("fisher_merging", {}, num_models=K).merge(t)


@pytest.mark.parametrize("value", [0.0, -0.5])
def test_base_weight_must_be_positive(value):
    with pytest.raises(ConfigError, match="fisher_merging': base_weight: Input should be greater than 0"):
        build_method("fisher_merging", {"base_weight": value}, num_models=2)
