"""RegMean against a float64 least-squares reference of the stacked problem, and its rules for everything else."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.errors import ConfigError
from obim_trainer.merging import ParamKind, TensorTask, build_method
from obim_trainer.merging.least_squares import solve_least_squares
from obim_trainer.merging.registry import StatisticsNeeds
from obim_trainer.merging.regmean import RIDGED_NOTE

OUT, IN, K = 5, 7, 3


def inputs(rows: int, seed: int, unused: int = 0) -> torch.Tensor:
    """Layer inputs X ([rows, IN], float64) of one model on its text; the last ``unused`` features never fire."""
    x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if unused:
        x[:, IN - unused :] = 0.0
    return x


def gram(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def family(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(OUT, IN, generator=gen)
    return base, [base + 0.3 * torch.randn(OUT, IN, generator=gen) for _ in range(K)]


def reference(base, ckpts, xs, c: float) -> torch.Tensor:
    """argmin_W Σ_i w_i‖X_i Wᵀ − X_i W_iᵀ‖²/n_i by lstsq on rows stacked with weights √(w_i/n_i)."""
    weights = [c] + [1.0 / len(ckpts)] * len(ckpts)
    rows, targets = [], []
    for w, x, weight in zip(weights, xs, [base, *ckpts], strict=True):
        scale = (w / x.shape[0]) ** 0.5
        rows.append(scale * x)
        targets.append(scale * x @ weight.double().T)
    return torch.linalg.lstsq(torch.cat(rows), torch.cat(targets), driver="gelsd").solution.T


def task(base, ckpts, xs, *, conv1d=False, kind=ParamKind.LINEAR, name="model.layers.0.mlp.up_proj.weight"):
    grams = [gram(x) for x in xs]
    if conv1d:
        base, ckpts = base.T.contiguous(), [w.T.contiguous() for w in ckpts]
    return TensorTask.from_tensors(
        name, base, ckpts, kind=kind, in_axis=0 if conv1d else 1, base_gram=grams[0], checkpoint_grams=grams[1:]
    )


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("c", [0.3, 1.0, 3.0])
def test_equals_the_stacked_least_squares_problem(conv1d, c):
    base, ckpts = family()
    xs = [inputs(40, 10), *(inputs(30 + k, 20 + k) for k in range(K))]
    out = build_method("regmean", {"base_weight": c}, num_models=K).merge(task(base, ckpts, xs, conv1d=conv1d))
    merged = out.tensor.T if conv1d else out.tensor
    assert out.tensor.dtype == torch.float32 and out.tensor.shape == ((IN, OUT) if conv1d else (OUT, IN))
    torch.testing.assert_close(merged.double(), reference(base, ckpts, xs, c), rtol=0, atol=1e-5)
    assert out.notes == {RIDGED_NOTE: 0}


def test_identity_grams_give_the_weighted_average():
    base, ckpts = family(1)
    eye = torch.eye(IN, dtype=torch.float64)
    t = TensorTask.from_tensors("w", base, ckpts, kind=ParamKind.LINEAR, base_gram=eye, checkpoint_grams=[eye] * K)
    merged = build_method("regmean", {"base_weight": 2.0}, num_models=K).merge(t).tensor
    expected = (2.0 * base + torch.stack(ckpts).mean(0)) / 3.0
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


def test_a_singular_checkpoint_gram_still_solves_and_is_counted():
    """Features the new language never uses: the checkpoints' Grams are singular, the base's is not."""
    base, ckpts = family(2)
    xs = [inputs(40, 10), *(inputs(30, 20 + k, unused=2) for k in range(K))]
    out = build_method("regmean", {}, num_models=K).merge(task(base, ckpts, xs))
    assert out.notes == {RIDGED_NOTE: 0}  # the sum of Grams is still positive definite
    torch.testing.assert_close(out.tensor.double(), reference(base, ckpts, xs, 1.0), rtol=0, atol=1e-5)
    everything_unused = [inputs(40, 10, unused=2), *(inputs(30, 20 + k, unused=2) for k in range(K))]
    out = build_method("regmean", {}, num_models=K).merge(task(base, ckpts, everything_unused))
    assert out.notes == {RIDGED_NOTE: 1} and torch.isfinite(out.tensor).all()
    # on the inputs that occur, the ridge changes nothing that matters: the outputs match the reference
    x = torch.cat(everything_unused)
    ref = reference(base, ckpts, everything_unused, 1.0)
    torch.testing.assert_close(x @ out.tensor.double().T, x @ ref.T, rtol=0, atol=1e-4)
    # and the columns of inputs no text uses keep the base's weights (the ridge shrinks the update, not W)
    torch.testing.assert_close(out.tensor[:, IN - 2 :], base[:, IN - 2 :], rtol=0, atol=1e-6)


def test_alpha_shrinks_every_gram_toward_its_diagonal():
    base, ckpts = family(3)
    xs = [inputs(40, 10), *(inputs(30, 20 + k) for k in range(K))]
    alpha = 0.4
    grams = [gram(x) for x in xs]
    shrunk = [alpha * g + (1 - alpha) * torch.diag(g.diagonal()) for g in grams]
    t = TensorTask.from_tensors("w", base, ckpts, kind=ParamKind.LINEAR, base_gram=grams[0], checkpoint_grams=grams[1:])
    merged = build_method("regmean", {"alpha": alpha}, num_models=K).merge(t).tensor.double()
    numerator = (
        1.0 * base.double() @ shrunk[0] + sum(w.double() @ g for w, g in zip(ckpts, shrunk[1:], strict=True)) / K
    )
    expected = numerator @ torch.linalg.inv(shrunk[0] + sum(shrunk[1:]) / K)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)
    full = build_method("regmean", {}, num_models=K).merge(t).tensor.double()
    assert (merged - full).abs().max() > 1e-3
    # alpha = 0 keeps only the diagonals: each input column is averaged on its own
    zero = build_method("regmean", {"alpha": 0.0}, num_models=K).merge(t).tensor.double()
    d = [g.diagonal() for g in grams]
    column = (base.double() * d[0] + sum(w.double() * dk for w, dk in zip(ckpts, d[1:], strict=True)) / K) / (
        d[0] + sum(d[1:]) / K
    )
    torch.testing.assert_close(zero, column, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "name", "grams"),
    [
        (ParamKind.EMBEDDING, "model.embed_tokens.weight", False),
        (ParamKind.OTHER, "model.layers.0.input_layernorm.weight", False),
        (ParamKind.OTHER, "model.layers.0.self_attn.q_proj.bias", False),
        (ParamKind.LINEAR, "lm_head.weight", False),  # a head tied to the embeddings has no Gram of its own
    ],
)
def test_everything_but_linear_weights_with_grams_shrinks_toward_the_base(kind, name, grams):
    base, ckpts = family(4)
    t = TensorTask.from_tensors(name, base, ckpts, kind=kind)
    out = build_method("regmean", {"base_weight": 3.0}, num_models=K).merge(t)
    expected = base + (torch.stack(ckpts) - base).mean(0) / 4.0
    torch.testing.assert_close(out.tensor, expected, rtol=0, atol=1e-6)
    assert not out.notes


def test_statistics_follow_the_params():
    """Sequential (the default) reads the texts themselves; sequential: false reads cached Grams."""
    assert build_method("regmean", {}, num_models=2).statistics() == StatisticsNeeds(sequential=True, per_language=True)
    fixed = {"sequential": False}
    assert build_method("regmean", fixed, num_models=2).statistics() == StatisticsNeeds(grams=True, per_language=True)
    mixed = build_method("regmean", {**fixed, "statistics": "mixed"}, num_models=2).statistics()
    assert mixed == StatisticsNeeds(grams=True, per_language=False)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"base_weight": 0.0}, "base_weight: Input should be greater than 0"),
        ({"base_weight": -1.0}, "base_weight: Input should be greater than 0"),
        ({"alpha": 1.5}, "alpha: Input should be less than or equal to 1"),
        ({"alpha": -0.1}, "alpha: Input should be greater than or equal to 0"),
        ({"statistics": "both"}, "statistics"),
    ],
)
def test_bad_params_get_one_clear_error(params, match):
    with pytest.raises(ConfigError, match=f"invalid parameters for method 'regmean': {match}"):
        build_method("regmean", params, num_models=2)


def test_grams_of_another_model_are_named():
    base, ckpts = family(5)
    wrong = torch.eye(IN + 1, dtype=torch.float64)
    t = TensorTask.from_tensors("w", base, ckpts, kind=ParamKind.LINEAR, base_gram=wrong, checkpoint_grams=[wrong] * K)
    with pytest.raises(ValueError, match="belong to another model"):
        build_method("regmean", {}, num_models=K).merge(t)


def test_a_gram_indefinite_by_rounding_gets_a_larger_ridge():
    # eigenvalues 1 … 1 and −1e-5·mean: the first ridge (1e-6·mean) is too small, the next one solves
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))
    eigen = torch.ones(16, dtype=torch.float64)
    eigen[-1] = -1e-5
    gram = basis @ torch.diag(eigen) @ basis.T
    numerator = torch.randn(4, 16, generator=generator, dtype=torch.float64)
    solution, ridged = solve_least_squares(numerator, gram)
    assert ridged and torch.isfinite(solution).all()
    ridged_gram = gram + 1e-4 * gram.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(solution @ ridged_gram, numerator)


def test_a_matrix_far_from_a_gram_is_refused():
    with pytest.raises(ValueError, match="not positive definite even with a ridge"):
        solve_least_squares(torch.ones(2, 3, dtype=torch.float64), -torch.eye(3, dtype=torch.float64))
