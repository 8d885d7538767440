"""TIES: trimming, sign election with both tie rules, disjoint mean, against a brute force."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.errors import ConfigError
from obim_trainer.merging import build_method
from tests.merging.conftest import random_family, run


def brute_force_ties(base, ckpts, weights, density, lam=1.0, tie="zero"):
    """TIES as the paper writes it, with per-model weights in the vote (mergekit)."""
    trimmed = []
    for c in ckpts:
        delta = (c - base).flatten()
        keep = max(1, int(density * delta.numel()))
        order = sorted(range(delta.numel()), key=lambda i: (-abs(float(delta[i])), i))
        mask = torch.zeros_like(delta)
        mask[order[:keep]] = 1
        trimmed.append(delta * mask)
    weighted = [w * t for w, t in zip(weights, trimmed, strict=True)]
    out = torch.zeros_like(weighted[0])
    for i in range(out.numel()):
        total = sum(float(t[i]) for t in weighted)
        sign = (total > 0) - (total < 0) or (1 if tie == "positive" else 0)
        agree = [k for k, t in enumerate(weighted) if sign != 0 and float(t[i]) * sign > 0]
        if agree:
            out[i] = sum(float(weighted[k][i]) for k in agree) / sum(weights[k] for k in agree)
    return base + lam * out.view(base.shape)


@pytest.mark.parametrize(("weights", "density"), [([1.0, 1.0, 1.0], 0.2), ([0.5, 2.0, 1.0], 0.5)])
def test_matches_the_brute_force(weights, density):
    base, ckpts = random_family(shape=(6, 7))
    got = run("ties", {"weight": weights, "density": density, "lambda": 0.9}, base, ckpts)
    torch.testing.assert_close(got, brute_force_ties(base, ckpts, weights, density, lam=0.9))


def test_paper_defaults_keep_the_top_fifth():
    method_params = build_method("ties", {}, num_models=3).describe()
    assert method_params["density"] == 0.2 and method_params["lambda"] == 1.0 and method_params["normalize"]
    base, ckpts = random_family(k=1, shape=(10, 10))
    assert int((run("ties", {}, base, ckpts) != base).sum()) == 20


def test_density_zero_is_the_base_and_density_one_is_the_plain_disjoint_mean(family):
    base, ckpts = family
    assert torch.equal(run("ties", {"density": 0.0}, base, ckpts), base)
    torch.testing.assert_close(
        run("ties", {"density": 1.0}, base, ckpts), brute_force_ties(base, ckpts, [1.0] * 3, 1.0)
    )


def test_sign_ties_keep_the_base_by_default_and_go_positive_like_mergekit():
    base = torch.zeros(4)
    ckpts = [torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([-1.0, 1.0, -3.0, 0.0])]
    assert run("ties", {"density": 1.0}, base, ckpts).tolist() == [0.0, 0.0, -3.0, 0.0]
    assert run("ties", {"density": 1.0, "sign_tie": "positive"}, base, ckpts).tolist() == [1.0, 1.0, -3.0, 0.0]


def test_zero_deltas_single_model_and_identical_models(family):
    base, ckpts = family
    assert torch.equal(run("ties", {}, base, [base.clone(), base.clone()]), base)
    single = run("ties", {"density": 0.5}, base, ckpts[:1])
    kept = single != base
    assert int(kept.sum()) == base.numel() // 2
    torch.testing.assert_close(single[kept], ckpts[0][kept])
    torch.testing.assert_close(run("ties", {"density": 0.5}, base, [ckpts[0], ckpts[0].clone()]), single)


def test_rescale_restores_each_trimmed_task_vectors_l1_norm():
    base, ckpts = random_family(k=1, shape=(20, 20))
    merged = run("ties", {"density": 0.3, "rescale": True}, base, ckpts)
    torch.testing.assert_close((merged - base).abs().sum(), (ckpts[0] - base).abs().sum())


def test_density_lists_and_ranges_are_checked(family):
    base, ckpts = family
    with pytest.raises(ConfigError, match="density has 4 value"):
        run("ties", {"density": [0.1] * 4}, base, ckpts)
    with pytest.raises(ConfigError, match=r"every density must lie in \[0, 1\]"):
        run("ties", {"density": 1.2}, base, ckpts)
