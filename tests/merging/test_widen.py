"""WIDEN: the special cases of eqs. 3-7 and zero columns."""

from __future__ import annotations

import torch

from obim_trainer.merging.widen import importance, ranked_scores
from tests.merging.conftest import run


def test_negative_t_with_s_one_over_n_is_averaging_and_s_lambda_is_task_arithmetic(family):
    base, ckpts = family
    torch.testing.assert_close(run("widen", {"t": -1.0, "s": 1 / 3}, base, ckpts), run("average", {}, base, ckpts))
    torch.testing.assert_close(
        run("widen", {"t": -1.0, "s": 0.7}, base, ckpts), run("task_arithmetic", {"lambda": 0.7}, base, ckpts)
    )
    bias, bias_ckpts = base[0], [c[0] for c in ckpts]
    torch.testing.assert_close(run("widen", {"t": -1.0, "s": 1 / 3}, bias, bias_ckpts), torch.stack(bias_ckpts).mean(0))


def test_ranking_is_inside_each_model_and_softmax_across_models():
    div = torch.tensor([[0.3, 0.1, 0.2], [5.0, 7.0, 6.0]])
    assert torch.equal(ranked_scores(div), torch.tensor([[2, 0, 1], [0, 2, 1]]) / 3)
    weights = importance(div, t=10.0, s=1.0)  # threshold never reached: pure softmax
    torch.testing.assert_close(weights.sum(0), torch.ones(3))


def test_zero_columns_give_no_nan(family):
    base, ckpts = family
    base = base.clone()
    base[:, 3] = 0
    ckpts = [c.clone() for c in ckpts]
    ckpts[0][:, 3] = 0
    ckpts[1][:, 5] = 0
    merged = run("widen", {}, base, ckpts)
    assert torch.isfinite(merged).all()
