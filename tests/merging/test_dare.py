"""DARE: random drops, both rescaling rules, edge densities, reproducibility, unbiasedness."""

from __future__ import annotations

import torch

from obim_trainer.merging import build_method
from tests.merging.conftest import make_task, random_family, run


def test_density_zero_drops_everything_and_one_keeps_everything(family):
    base, ckpts = family
    for method in ("dare_linear", "dare_ties"):
        assert torch.equal(run(method, {"density": 0.0}, base, ckpts), base)  # drop rate p = 1
    torch.testing.assert_close(
        run("dare_linear", {"density": 1.0}, base, ckpts), run("task_arithmetic", {}, base, ckpts)
    )
    torch.testing.assert_close(
        run("dare_ties", {"density": 1.0}, base, ckpts), run("ties", {"density": 1.0}, base, ckpts)
    )


def test_inverse_rescaling_divides_kept_entries_by_the_density(family):
    base, ckpts = family
    merged = run("dare_linear", {"density": 0.25}, base, ckpts[:1], seed=5)
    delta = ckpts[0] - base
    kept = merged != base
    torch.testing.assert_close((merged - base)[kept], delta[kept] / 0.25)
    assert 0.1 < kept.float().mean() < 0.4
    no_rescale = run("dare_linear", {"density": 0.25, "rescale": False}, base, ckpts[:1], seed=5)
    torch.testing.assert_close((no_rescale - base)[kept], delta[kept])


def test_l1_rescaling_restores_the_norm(family):
    base, ckpts = family
    merged = run("dare_linear", {"density": 0.5, "rescale_mode": "l1"}, base, ckpts[:1], seed=2)
    torch.testing.assert_close((merged - base).abs().sum(), (ckpts[0] - base).abs().sum())


def test_the_mask_depends_on_seed_tensor_and_checkpoint_only(family):
    base, ckpts = family
    first = run("dare_linear", {"density": 0.5}, base, ckpts, seed=5)
    assert torch.equal(first, run("dare_linear", {"density": 0.5}, base, ckpts, seed=5))
    assert not torch.equal(first, run("dare_linear", {"density": 0.5}, base, ckpts, seed=6))
    assert not torch.equal(first, run("dare_linear", {"density": 0.5}, base, ckpts, seed=5, name="other.weight"))
    two = run("dare_linear", {"density": 0.5}, base, [ckpts[0], ckpts[0].clone()], seed=5)
    copies_kept = ((two - base) / ((ckpts[0] - base) / 0.5)).round()  # 0, 1 or 2 of the identical copies
    assert set(copies_kept.unique().tolist()) == {0.0, 1.0, 2.0}  # each copy has its own mask


def test_paper_rescaling_is_unbiased_in_expectation():
    base, ckpts = random_family(shape=(16, 16))
    target = run("task_arithmetic", {}, base, ckpts)
    method = build_method("dare_linear", {"density": 0.3}, num_models=3)
    mean = torch.stack([method.merge(make_task(base, ckpts, seed=s)).tensor for s in range(400)]).mean(0)
    error = (mean - target).abs().mean() / (target - base).abs().mean()
    assert error < 0.1  # sampling noise ~ sqrt((1 - p) / p / 400) ≈ 0.08 per entry, less on the mean


def test_dare_ties_elects_signs_on_the_dropped_deltas():
    base = torch.zeros(2000)
    ckpts = [torch.ones(2000), -torch.ones(2000)]
    merged = run("dare_ties", {"density": 0.5}, base, ckpts, seed=1)
    # where exactly one side survives it wins alone (disjoint mean of one: ±1/0.5); both or none: 0
    assert set(merged.unique().tolist()) <= {-2.0, 0.0, 2.0}
    assert 0.3 < (merged != 0).float().mean() < 0.7
