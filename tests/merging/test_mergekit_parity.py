"""Numerical ground truth: our methods against mergekit 0.1.5 on tensors of a tiny real model.

mergekit's in-memory API (``mergekit.merge_methods.api.merge_tensors``) merges one tensor group.
Deterministic methods must agree to float rounding once our parameters are set to mergekit's
conventions (``sign_tie: positive``; ``normalize: false`` where mergekit defaults to it;
``clip_cos: false``). Random ones are compared with the same mask: mergekit's ``torch.bernoulli``
is replaced by a function that returns the mask our seeded generator draws for that checkpoint,
and the keep probabilities mergekit asks for are checked against ours.
"""

from __future__ import annotations

import pytest
import torch

from obim_trainer.merging import ParamKind, TensorTask, build_method
from obim_trainer.merging.sparsify import della_keep_probability, random_keep_mask
from tests.conftest import make_tiny_llama, perturbed_copy

mergekit_api = pytest.importorskip("mergekit.merge_methods.api", reason="mergekit (the test extra) is not installed")
mergekit_sparsify = pytest.importorskip("mergekit.sparsify", reason="mergekit (the test extra) is not installed")

NAMES = {
    "model.layers.0.self_attn.q_proj.weight": ParamKind.LINEAR,
    "model.layers.1.mlp.down_proj.weight": ParamKind.LINEAR,
    "model.embed_tokens.weight": ParamKind.EMBEDDING,
    "model.norm.weight": ParamKind.OTHER,
}
SEED = 3


@pytest.fixture(scope="module")
def tensors() -> dict[str, list[torch.Tensor]]:
    """Base and 3 checkpoints of a tiny Llama; the base's norms are made non-constant so every
    task vector has a norm well above mergekit's clamp of 1e-6 on the product of two norms."""
    base = make_tiny_llama(seed=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    ckpts = [perturbed_copy(base, seed=20 + i, scale=0.05 * (i + 1)) for i in range(3)]
    sds = [m.state_dict() for m in (base, *ckpts)]
    return {name: [sd[name].float() for sd in sds] for name in NAMES}


def make_task(name: str, inputs: list[torch.Tensor]) -> TensorTask:
    base, *ckpts = inputs
    return TensorTask.from_tensors(name, base, ckpts, kind=NAMES[name], seed=SEED)


def ours(method: str, params: dict, name: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    task = make_task(name, inputs)
    return build_method(method, params, num_models=task.num_models).merge(task).tensor


def theirs(method: str, params: dict, inputs: list[torch.Tensor]) -> torch.Tensor:
    """mergekit keys per-model parameters by input id; the base is input 0."""
    keyed = {k: {i + 1: x for i, x in enumerate(v)} if isinstance(v, list) else v for k, v in params.items()}
    return mergekit_api.merge_tensors(inputs, method, parameters=keyed, base_index=0)


# (method, parameters given to both, our settings for mergekit's conventions)
DETERMINISTIC = [
    ("task_arithmetic", {"weight": [0.5, 0.3, 0.2], "lambda": 0.8}, {}),
    ("task_arithmetic", {"weight": [1.0, 2.0, 0.5], "normalize": True}, {}),
    ("ties", {"weight": [0.5, 0.3, 0.2], "density": 0.4}, {"sign_tie": "positive"}),
    ("ties", {"weight": 1.0, "density": [0.4, 0.6, 0.2], "normalize": False, "lambda": 0.7}, {"sign_tie": "positive"}),
    ("ties", {"weight": [1.0, -0.5, 0.8], "density": 0.3, "rescale": True}, {"sign_tie": "positive"}),
    ("breadcrumbs", {"weight": 1.0, "density": 0.8, "gamma": 0.05}, {}),
    ("breadcrumbs", {"weight": [0.3, 0.3, 0.4], "density": 0.9, "gamma": 0.01, "rescale": True}, {}),
    (
        "breadcrumbs_ties",
        {"weight": [1.0, 0.5, 0.5], "density": 0.7, "gamma": 0.02},
        {"normalize": False, "sign_tie": "positive"},
    ),
    ("model_stock", {}, {"clip_cos": False}),
    ("model_stock", {"filter_wise": True}, {"clip_cos": False}),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("method", "shared", "convention"), DETERMINISTIC)
def test_deterministic_methods_match_mergekit(tensors, name, method, shared, convention):
    inputs = tensors[name]
    expected = theirs(method, shared, inputs)
    got = ours(method, {**shared, **convention}, name, inputs)
    assert not torch.equal(expected, inputs[0]), "the comparison must not be trivial"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 1.0])
def test_slerp_matches_mergekit(tensors, name, t):
    base, first = tensors[name][:2]
    expected = mergekit_api.merge_tensors([base, first], "slerp", parameters={"t": t}, base_index=0)
    torch.testing.assert_close(ours("slerp", {"t": t}, name, [base, first]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_average_matches_mergekit_linear(tensors, name):
    _, *ckpts = tensors[name]
    expected = mergekit_api.merge_tensors(ckpts, "linear", parameters={"weight": [1.0, 2.0, 3.0]})
    torch.testing.assert_close(ours("average", {"weight": [1.0, 2.0, 3.0]}, name, tensors[name]), expected)


class OurMasks:
    """Stands in for ``torch.bernoulli`` inside mergekit: the n-th call (checkpoint n) gets the mask our
    seeded generator draws for checkpoint n with the probabilities mergekit asks for."""

    def __init__(self, task: TensorTask) -> None:
        self.task, self.probabilities = task, []

    def __call__(self, probabilities: torch.Tensor) -> torch.Tensor:
        k = len(self.probabilities)
        self.probabilities.append(probabilities.clone())
        return random_keep_mask(self.task, k, probabilities.view(self.task.base.shape)).to(probabilities.dtype)


RANDOM = [
    ("dare_linear", {"weight": [0.5, 0.3, 0.2], "density": 0.6}, {}),
    ("dare_ties", {"weight": 1.0, "density": [0.3, 0.5, 0.7]}, {"normalize": False, "sign_tie": "positive"}),
    ("della", {"weight": [1.0, 0.7, 0.4], "density": 0.5, "epsilon": 0.1}, {"sign_tie": "positive"}),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("method", "shared", "convention"), RANDOM)
def test_random_methods_match_mergekit_with_the_same_mask(tensors, name, method, shared, convention, monkeypatch):
    inputs = tensors[name]
    masks = OurMasks(make_task(name, inputs))
    monkeypatch.setattr(mergekit_sparsify.torch, "bernoulli", masks)
    expected = theirs(method, shared, inputs)
    got = ours(method, {**shared, **convention, "rescale_mode": "l1"}, name, inputs)
    assert len(masks.probabilities) == 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if method == "della":
        for k, probabilities in enumerate(masks.probabilities):
            delta = inputs[k + 1] - inputs[0]
            torch.testing.assert_close(probabilities.view(delta.shape), della_keep_probability(delta, 0.5, 0.1))
