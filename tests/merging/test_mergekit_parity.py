"""Numerical ground truth: our methods against mergekit 0.1.5 on tensors of a tiny real model.

Deterministic methods must agree exactly (to float rounding). Random ones are compared with the
same mask: mergekit's ``torch.bernoulli`` is fed the masks our seeded generator draws, and the
keep probabilities mergekit asks for are checked against ours.
"""

from __future__ import annotations

import pytest
import torch

from obim_trainer.merging import ParamKind, TensorTask, build_method
from tests.conftest import make_tiny_llama, perturbed_copy

mergekit_api = pytest.importorskip("mergekit.merge_methods.api", reason="mergekit (test extra) is not installed")
mergekit_sparsify = pytest.importorskip("mergekit.sparsify")

NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]


@pytest.fixture(scope="module")
def tensors():
    base = make_tiny_llama(seed=1)
    ckpts = [perturbed_copy(base, seed=20 + i, scale=0.05 * (i + 1)) for i in range(3)]
    sds = [m.state_dict() for m in (base, *ckpts)]
    return {name: [sd[name].float() for sd in sds] for name in NAMES}


def ours(method, params, name, inputs, k=None):
    base, *ckpts = inputs
    ckpts = ckpts[:k] if k else ckpts
    task = TensorTask.from_tensors(name, base, ckpts, kind=ParamKind.OTHER, seed=3)
    return build_method(method, params, num_models=len(ckpts)).merge(task).tensor


def per_input(values):
    """mergekit keys per-model parameters by input id (the base is input 0)."""
    return {i + 1: v for i, v in enumerate(values)} if isinstance(values, list) else values


def theirs(method, params, inputs, base_index=0):
    mk = {k: per_input(v) for k, v in params.items()}
    return mergekit_api.merge_tensors(inputs, method, parameters=mk, base_index=base_index)


DETERMINISTIC = [
    ("task_arithmetic", {"weight": [0.5, 0.3, 0.2], "lambda": 0.8}, {}),
    ("task_arithmetic", {"weight": [1.0, 2.0, 0.5], "normalize": True}, {}),
    ("ties", {"weight": [0.5, 0.3, 0.2], "density": 0.4}, {}),
    ("ties", {"weight": 1.0, "density": [0.4, 0.6, 0.2], "normalize": False, "lambda": 0.7}, {}),
    ("breadcrumbs", {"weight": 1.0, "density": 0.8, "gamma": 0.05}, {}),
    ("breadcrumbs_ties", {"weight": [1.0, 0.5, 0.5], "density": 0.7, "gamma": 0.02}, {}),
    ("model_stock", {}, {"clamp_t": False}),
    ("model_stock", {"filter_wise": True}, {"filter_wise": True, "clamp_t": False}),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("method", "params", "override"), DETERMINISTIC)
def test_deterministic_methods_match_mergekit(tensors, name, method, params, override):
    inputs = tensors[name]
    expected = theirs(method, params, inputs)
    got = ours(method, {**params, **override}, name, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_slerp_and_linear_match_mergekit(tensors, name):
    base, c0, c1, c2 = tensors[name]
    for t in (0.0, 0.3, 0.7, 1.0):
        expected = mergekit_api.merge_tensors([base, c0], "slerp", parameters={"t": t}, base_index=0)
        torch.testing.assert_close(ours("slerp", {"t": t}, name, [base, c0]), expected, rtol=1e-5, atol=1e-6)
    expected = mergekit_api.merge_tensors([c0, c1, c2], "linear", parameters={"weight": {0: 1.0, 1: 2.0, 2: 3.0}})
    torch.testing.assert_close(ours("average", {"weight": [1.0, 2.0, 3.0]}, name, tensors[name]), expected)


class SameMask:
    """Stands in for mergekit's torch.bernoulli: records the probabilities, returns our seeded masks."""

    def __init__(self, method: str, name: str):
        self.method, self.name, self.calls, self.probabilities = method, name, 0, []

    def __call__(self, probabilities: torch.Tensor) -> torch.Tensor:
        task = TensorTask.from_tensors(self.name, torch.zeros(1), [torch.zeros(1)], seed=3)
        draw = torch.rand(probabilities.shape, generator=task.generator(self.method, self.calls))
        self.calls += 1
        self.probabilities.append(probabilities.clone())
        return (draw < probabilities).to(probabilities.dtype)


@pytest.mark.parametrize("name", NAMES[:2])
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("dare_linear", {"weight": [0.5, 0.3, 0.2], "density": 0.6}),
        ("dare_ties", {"weight": 1.0, "density": [0.3, 0.5, 0.7]}),
        ("della", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
    ],
)
def test_random_methods_match_mergekit_with_the_same_mask(tensors, name, method, params, monkeypatch):
    inputs = tensors[name]
    fake = SameMask(method, name)
    monkeypatch.setattr(mergekit_sparsify.torch, "bernoulli", fake)
    expected = theirs(method, params, inputs)
    got = ours(method, {**params, "rescale_mode": "l1"}, name, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert fake.calls == 3
    if method == "della":
        from obim_trainer.merging.sparsify import della_keep_probability

        for k, probs in enumerate(fake.probabilities):
            delta = inputs[k + 1] - inputs[0]
            torch.testing.assert_close(probs.reshape(delta.shape), della_keep_probability(delta, 0.5, 0.1))


def test_dare_paper_rescaling_is_unbiased(tensors):
    name = NAMES[0]
    base, *ckpts = tensors[name]
    target = base + sum(c - base for c in ckpts)
    runs = []
    for seed in range(300):
        task = TensorTask.from_tensors(name, base, ckpts, kind=ParamKind.OTHER, seed=seed)
        runs.append(build_method("dare_linear", {"density": 0.5}, num_models=3).merge(task).tensor)
    mean = torch.stack(runs).mean(0)
    scale = (target - base).abs().mean()
    assert (mean - target).abs().mean() < 0.1 * scale
