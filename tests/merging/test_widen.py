"""WIDEN against the authors' formulation, its special cases (eqs. 3-7) and zero columns."""

from __future__ import annotations

import torch

from obim_trainer.merging import ParamKind
from obim_trainer.merging.widen import importance, ranked_scores
from tests.merging.conftest import random_family, run


def authors_widen(base: torch.Tensor, ckpts: list[torch.Tensor], t: float, s: float) -> torch.Tensor:
    """The released WidenMerging for one Linear weight [out, in], written with D = W / m and cosine_similarity."""

    def rank(diff):  # ascending rank within each model / in_dim
        order = torch.argsort(diff, dim=1, stable=True)
        ranks = torch.zeros_like(diff)
        for n in range(diff.shape[0]):
            ranks[n, order[n]] = torch.arange(diff.shape[1], dtype=torch.float32) / diff.shape[1]
        return ranks

    def scores(significance):
        out = torch.softmax(significance, dim=0)
        out[significance > significance.mean(dim=1, keepdim=True) * t] = s
        return out

    m_pre = base.norm(dim=0)
    d_pre = base / m_pre
    mag = torch.stack([(c.norm(dim=0) - m_pre).abs() for c in ckpts])
    direction = torch.stack([1 - torch.cosine_similarity(c / c.norm(dim=0), d_pre, dim=0) for c in ckpts])
    weight = 0.5 * (scores(rank(mag)) + scores(rank(direction)))
    deltas = torch.stack([c - base for c in ckpts])
    return base + (deltas * weight.unsqueeze(1)).sum(0)


def test_linear_weight_matches_the_authors_formulation():
    base, ckpts = random_family(shape=(10, 16), scale=0.3)
    for t, s in ((1.0, 1.0), (2.0, 1.0), (0.5, 0.3)):
        torch.testing.assert_close(
            run("widen", {"t": t, "s": s}, base, ckpts, kind=ParamKind.LINEAR), authors_widen(base, ckpts, t, s)
        )


def test_embeddings_are_ranked_by_token_rows():
    base, ckpts = random_family(shape=(16, 10), scale=0.3)
    as_embedding = run("widen", {}, base, ckpts, kind=ParamKind.EMBEDDING)
    transposed = authors_widen(base.T.contiguous(), [c.T.contiguous() for c in ckpts], 1.0, 1.0).T
    torch.testing.assert_close(as_embedding, transposed)


def test_vectors_use_the_calibrated_softmax_of_raw_magnitudes():
    base = torch.zeros(4)
    ckpts = [torch.tensor([0.1, 0.0, 2.0, 0.1]), torch.tensor([0.1, 0.3, 0.0, -0.1])]
    deltas = torch.stack(ckpts)
    weight = torch.softmax(deltas.abs(), dim=0)
    weight[deltas.abs() > deltas.abs().mean(dim=1, keepdim=True) * 1.0] = 1.0
    torch.testing.assert_close(run("widen", {}, base, ckpts), (weight * deltas).sum(0))


def test_negative_t_with_s_one_over_n_is_averaging_and_s_lambda_is_task_arithmetic(family):
    base, ckpts = family
    for kind in (ParamKind.LINEAR, ParamKind.EMBEDDING):
        torch.testing.assert_close(
            run("widen", {"t": -1.0, "s": 1 / 3}, base, ckpts, kind=kind), run("average", {}, base, ckpts)
        )
        torch.testing.assert_close(
            run("widen", {"t": -1.0, "s": 0.7}, base, ckpts, kind=kind),
            run("task_arithmetic", {"lambda": 0.7}, base, ckpts),
        )
    bias, bias_ckpts = base[0], [c[0] for c in ckpts]
    torch.testing.assert_close(run("widen", {"t": -1.0, "s": 1 / 3}, bias, bias_ckpts), torch.stack(bias_ckpts).mean(0))


def test_ranking_is_inside_each_model_and_softmax_across_models():
    div = torch.tensor([[0.3, 0.1, 0.2], [5.0, 7.0, 6.0]])
    assert torch.equal(ranked_scores(div), torch.tensor([[2, 0, 1], [0, 2, 1]]) / 3)
    assert torch.equal(ranked_scores(torch.zeros(1, 3)), torch.tensor([[0, 1, 2]]) / 3)  # ties by column index
    weights = importance(ranked_scores(div), t=10.0, s=1.0)  # threshold never reached: pure softmax
    torch.testing.assert_close(weights.sum(0), torch.ones(3))


def test_zero_columns_give_no_nan_and_an_unchanged_zero_column_stays_zero(family):
    base, ckpts = family
    base = base.clone()
    base[:, 3] = 0
    ckpts = [c.clone() for c in ckpts]
    for c in ckpts:
        c[:, 3] = 0  # zero in the base and every checkpoint: unchanged
    ckpts[1][:, 5] = 0  # zero in one checkpoint only: its direction turned completely
    merged = run("widen", {}, base, ckpts, kind=ParamKind.LINEAR)
    assert torch.isfinite(merged).all()
    assert torch.equal(merged[:, 3], torch.zeros(base.shape[0]))


def test_zero_deltas_single_model_and_identical_models(family):
    base, ckpts = family
    assert torch.equal(run("widen", {}, base, [base.clone(), base.clone()], kind=ParamKind.LINEAR), base)
    torch.testing.assert_close(run("widen", {"t": -1.0, "s": 1.0}, base, ckpts[:1], kind=ParamKind.LINEAR), ckpts[0])
    same = run("widen", {"t": -1.0, "s": 0.5}, base, [ckpts[0], ckpts[0].clone()], kind=ParamKind.LINEAR)
    torch.testing.assert_close(same, ckpts[0])
