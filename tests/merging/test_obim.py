"""OBIM on single tensors: a brute force written plainly here must agree exactly."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.errors import ConfigError
from obim_trainer.merging import ParamKind, TensorTask, build_method
from obim_trainer.merging.order import merge_order
from obim_trainer.merging.selection import apportion


def make_task(kind=ParamKind.LINEAR, block=None, k=3, shape=(6, 10), seed=0, conv1d=False):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    ckpts = [base + torch.randn(shape, generator=gen) * (0.1 * (i + 1)) for i in range(k)]
    sq = None
    if kind is ParamKind.LINEAR:
        in_dim = shape[0] if conv1d else shape[1]
        sq = [torch.rand(in_dim, generator=gen).view((-1, 1) if conv1d else (1, -1)) for _ in range(k)]
    task = TensorTask.from_tensors(
        "model.layers.0.mlp.up_proj.weight", base, ckpts, kind=kind, block_index=block, input_sq_mean=sq, seed=seed
    )
    return task, base, ckpts, sq


def brute_force(base, ckpts, scores_per_model, ratios, order):
    numel = base.numel()
    result = base.flatten().tolist()
    owner = [-1] * numel
    for k, count in zip(order, apportion(numel, [ratios[k] for k in order]), strict=True):
        s = scores_per_model[k].flatten().tolist()
        free = sorted((i for i in range(numel) if owner[i] < 0), key=lambda i: (-s[i], i))
        for i in free[:count]:
            owner[i] = k
            result[i] = ckpts[k].flatten()[i].item()
    return torch.tensor(result).view(base.shape), owner


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("block", [None, 0, 1, 2, 5])
def test_linear_weights_agree_with_brute_force(block, conv1d):
    task, base, ckpts, sq = make_task(block=block, conv1d=conv1d, shape=(10, 6) if conv1d else (6, 10))
    method = build_method("obim", {}, num_models=3)
    out = method.merge(task)
    scores = [sq[k] * (ckpts[k] - base) ** 2 for k in range(3)]
    expected, owner = brute_force(base, ckpts, scores, [1 / 3] * 3, merge_order(3, block))
    assert torch.equal(out.tensor, expected)
    assert out.owned == [owner.count(k) for k in range(3)]
    assert -1 not in owner, "shares summing to 1 cover every position"


def test_exact_counts_disjoint_masks_and_base_elsewhere_with_partial_shares():
    task, base, ckpts, _ = make_task(shape=(13, 11))
    ratios = [0.3, 0.25, 0.15]
    out = build_method("obim", {"ratios": ratios, "order": "given"}, num_models=3).merge(task)
    counts = apportion(base.numel(), ratios)
    assert out.owned == counts
    from_k = [(out.tensor == c) & (c != base) for c in ckpts]
    for i in range(3):
        assert int(from_k[i].sum()) == counts[i]
        for j in range(i + 1, 3):
            assert not bool((from_k[i] & from_k[j]).any())
    untouched = ~(from_k[0] | from_k[1] | from_k[2])
    assert int(untouched.sum()) == base.numel() - sum(counts)
    assert torch.equal(out.tensor[untouched], base[untouched])


def test_rotation_puts_a_different_checkpoint_first_in_each_block():
    # all checkpoints change the same positions by the same magnitude (different signs/offsets per
    # checkpoint), so they compete for the same top positions and the first in order wins them
    pattern = torch.arange(1, 61, dtype=torch.float32).view(6, 10)
    base = torch.zeros(6, 10)
    ckpts = [pattern * (1 if k % 2 else -1) + 0.001 * k for k in range(3)]
    sq = [torch.ones(1, 10)] * 3
    firsts = []
    for block in range(4):
        task = TensorTask.from_tensors(
            "model.layers.0.mlp.up_proj.weight", base, ckpts, kind=ParamKind.LINEAR, block_index=block, input_sq_mean=sq
        )
        out = build_method("obim", {"ratios": [0.2, 0.2, 0.2]}, num_models=3).merge(task)
        firsts.append(next(k for k in range(3) if out.tensor[5, 9] == ckpts[k][5, 9]))
    assert firsts == [0, 1, 2, 0]
    assert merge_order(3, 4) == [1, 2, 0] and merge_order(3, None) == [0, 1, 2]


def test_priority_and_given_orders():
    assert merge_order(3, 7, "given") == [0, 1, 2]
    assert merge_order(3, 7, "priority", [0.1, 5, 1]) == [1, 2, 0]
    assert merge_order(3, 0, "priority", [1, 1, 0]) == [0, 1, 2]


def test_random_saliency_for_non_linear_is_seeded():
    def merged(seed, name="model.norm.weight"):
        gen = torch.Generator().manual_seed(1)
        base = torch.randn(50, generator=gen)
        ckpts = [base + torch.randn(50, generator=gen) for _ in range(2)]
        task = TensorTask.from_tensors(name, base, ckpts, kind=ParamKind.OTHER, seed=seed)
        return build_method("obim", {}, num_models=2).merge(task).tensor

    assert torch.equal(merged(0), merged(0))
    assert not torch.equal(merged(0), merged(1))
    assert not torch.equal(merged(0), merged(0, name="model.other.weight"))


def test_token_frequency_saliency_prefers_frequent_rows():
    gen = torch.Generator().manual_seed(0)
    base = torch.zeros(8, 4)
    ckpts = [torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)]
    counts = torch.tensor([100.0, 0, 0, 0, 0, 0, 0, 50]).view(-1, 1)
    task = TensorTask.from_tensors(
        "model.embed_tokens.weight", base, ckpts, kind=ParamKind.EMBEDDING, token_counts=counts
    )
    out = build_method(
        "obim", {"embedding_saliency": "token_frequency", "ratios": [0.25, 0.0], "order": "given"}, num_models=2
    ).merge(task)
    assert torch.equal(out.tensor[[0, 7]], ckpts[0][[0, 7]])  # the two frequent rows: 8 positions = 25%
    assert torch.equal(out.tensor[1:7], base[1:7])


def test_linear_without_statistics_is_a_clear_error():
    task, *_ = make_task()
    task.input_sq_mean = None
    with pytest.raises(ValueError, match=r"up_proj.weight.*activation statistics"):
        build_method("obim", {}, num_models=3).merge(task)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"ratios": [0.5, 0.5]}, "2 value(s)"),
        ({"ratios": [0.5, 0.4, 0.3]}, "sum to 1.2"),
        ({"ratios": [-0.1, 0.5, 0.5]}, "[0, 1]"),
        ({"order": "sideways"}, "order"),
        ({"order": "priority"}, "one priority per checkpoint"),
        ({"priority": [1, 2, 3]}, "only used with order 'priority'"),
        ({"ratio": [0.3]}, "Parameters it accepts"),
    ],
)
def test_parameter_errors(params, fragment):
    with pytest.raises(ConfigError) as info:
        build_method("obim", params, num_models=3)
    assert fragment in str(info.value)


def test_single_checkpoint_with_full_share_is_that_checkpoint():
    task, _, ckpts, _ = make_task(k=1)
    assert torch.equal(build_method("obim", {}, num_models=1).merge(task).tensor, ckpts[0])
