"""The Table 3 ablations are compositions: ties_obm = TIES with OBM trimming, ties_im = IM with |δ|."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.errors import ConfigError
from obim_trainer.merging import ParamKind, build_method, get_method
from obim_trainer.merging.iterative import iterative_merge
from obim_trainer.merging.order import merge_order
from obim_trainer.merging.saliency import magnitude_saliency
from tests.merging.conftest import make_task, random_family, run


def linear_stats(k: int, columns: int, values=None):
    row = torch.ones(1, columns) if values is None else torch.tensor(values, dtype=torch.float32).view(1, -1)
    return [row.clone() for _ in range(k)]


def test_ties_obm_with_uniform_activations_is_ties(family):
    base, ckpts = family
    got = run("ties_obm", {"density": 0.3}, base, ckpts, kind=ParamKind.LINEAR, input_sq_mean=linear_stats(3, 12))
    torch.testing.assert_close(got, run("ties", {"density": 0.3}, base, ckpts))


def test_ties_obm_trims_by_activation_weighted_saliency():
    base = torch.zeros(2, 4)
    delta = torch.tensor([[0.1, 1.0, 2.0, 3.0], [0.2, 1.5, 2.5, 0.5]])
    stats = linear_stats(1, 4, [1000.0, 1.0, 1.0, 1.0])  # column 0 carries huge activations
    got = run("ties_obm", {"density": 0.5}, base, [delta], kind=ParamKind.LINEAR, input_sq_mean=stats)
    saliency = delta.square() * stats[0]
    expected_kept = saliency >= saliency.flatten().sort(descending=True).values[3]
    assert torch.equal(got != 0, expected_kept) and got[0, 0] == pytest.approx(0.1)


def test_ties_obm_prunes_other_parameters_at_random_with_exact_counts(family):
    base, ckpts = family
    one = run("ties_obm", {"density": 0.25}, base, ckpts[:1], seed=1)
    assert int((one != base).sum()) == base.numel() // 4
    assert torch.equal(one, run("ties_obm", {"density": 0.25}, base, ckpts[:1], seed=1))
    assert not torch.equal(one, run("ties_obm", {"density": 0.25}, base, ckpts[:1], seed=2))


def test_ties_im_is_iterative_merging_with_magnitude_saliency(family):
    base, ckpts = family
    params = {"ratios": [0.5, 0.3, 0.2], "order": "rotation"}
    task = make_task(base, ckpts, kind=ParamKind.LINEAR, block_index=1)
    got = build_method("ties_im", params, num_models=3).merge(task)
    expected = iterative_merge(task, [0.5, 0.3, 0.2], merge_order(3, 1, "rotation"), magnitude_saliency)
    assert torch.equal(got.tensor, expected.tensor) and got.owned == expected.owned
    with_stats = make_task(base, ckpts, kind=ParamKind.LINEAR, block_index=1, input_sq_mean=linear_stats(3, 12))
    obim = build_method("obim", params, num_models=3).merge(with_stats)  # uniform activations: δ² ranks like |δ|
    assert torch.equal(got.tensor, obim.tensor)


def test_ties_im_takes_obims_iteration_parameters_only():
    cls = get_method("ties_im")
    assert set(cls.Params.model_fields) == {"ratios", "order", "priority"}
    assert not cls.needs_activation_stats and get_method("ties_obm").needs_activation_stats
    with pytest.raises(ConfigError, match="embedding_saliency"):
        build_method("ties_im", {"embedding_saliency": "random"}, num_models=2)
    with pytest.raises(ConfigError, match="ties_im: ratios"):
        build_method("ties_im", {"ratios": [0.5]}, num_models=2)


def test_ablations_on_zero_deltas_and_a_single_model():
    base, ckpts = random_family(k=1)
    assert torch.equal(run("ties_im", {}, base, [base.clone(), base.clone()]), base)
    torch.testing.assert_close(run("ties_im", {}, base, ckpts), ckpts[0])  # n_k = 1: everything
    assert torch.equal(run("ties_obm", {}, base, [base.clone(), base.clone()]), base)
