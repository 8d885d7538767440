"""OBIM on single tensors of every kind: a brute force written plainly here must agree exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from obim_trainer.errors import ConfigError
from obim_trainer.merging import ParamKind, TensorTask, build_method, get_method
from obim_trainer.merging.obim import OBIM
from obim_trainer.merging.task import derive_seed

K = 3


def plain_counts(numel, ratios):
    total = math.floor(numel * sum(ratios) + 0.5)
    counts = [math.floor(r * numel) for r in ratios]
    for i in sorted(range(len(ratios)), key=lambda i: (-(ratios[i] * numel - counts[i]), i))[: total - sum(counts)]:
        counts[i] += 1
    return counts


def plain_scores(case, k):
    """Saliency of checkpoint k at every flat position, one float32 product at a time (eq. 5)."""
    base, theta = case["base"].flatten().tolist(), case["ckpts"][k].flatten().tolist()
    cols = case["base"].shape[-1]
    if case["kind"] == "linear" or (case["kind"] == "embedding" and case.get("counts") is not None):
        scores = []
        for pos in range(len(base)):
            row, col = divmod(pos, cols)
            if case["kind"] == "embedding":
                weight = case["counts"][row]
            else:  # nn.Linear [out, in]: input feature = column; Conv1D [in, out]: input feature = row
                weight = case["sq"][k][row if case["conv1d"] else col]
            d = np.float32(theta[pos]) - np.float32(base[pos])
            scores.append(float(np.float32(d * d) * np.float32(weight)))
        return scores
    seed = derive_seed(case["seed"], case["name"], "saliency", k)
    return [plain_uniform(seed, pos) for pos in range(len(base))]  # random pruning


def plain_uniform(seed: int, position: int) -> float:
    """Random pruning's score of a position, written out: 24 bits of a 32-bit hash of (seed, position)."""

    def mix(v: int) -> int:
        v ^= v >> 16
        v = (v * 0x45D9F3B) & 0xFFFFFFFF
        v ^= v >> 16
        v = (v * 0x45D9F3B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    lo, hi = seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF
    return (mix((position & 0xFFFFFFFF) ^ lo ^ mix((position >> 32) ^ hi)) >> 8) / 2**24


def plain_obim(case, ratios, block):
    """Algorithm 1: rotate the order by the block, then each checkpoint takes its best free positions."""
    order = list(range(K)) if block is None else [(block + i) % K for i in range(K)]
    base = case["base"].flatten().tolist()
    result, owner = list(base), [-1] * len(base)
    for k, count in zip(order, plain_counts(len(base), [ratios[k] for k in order]), strict=True):
        s = plain_scores(case, k)
        theta = case["ckpts"][k].flatten().tolist()
        free = sorted((i for i in range(len(base)) if owner[i] < 0), key=lambda i: (-s[i], i))
        for i in free[:count]:
            owner[i], result[i] = k, theta[i]
    return torch.tensor(result).view(case["base"].shape), owner


def make_case(kind="linear", conv1d=False, counts=False, seed=0, block=None, shape=(6, 10)):
    gen = torch.Generator().manual_seed(seed + 100)
    if kind == "other":
        shape = (shape[0] * shape[1],)  # a norm weight or bias
    elif conv1d:
        shape = shape[::-1]
    base = torch.randn(shape, generator=gen)
    ckpts = [base + torch.randn(shape, generator=gen) * 0.1 * (i + 1) for i in range(K)]
    ckpts[1][0] = base[0]  # unchanged positions: zero saliency, many ties
    case = {"kind": kind, "conv1d": conv1d, "base": base, "ckpts": ckpts, "seed": seed, "counts": None}
    extra = {}
    if kind == "linear":
        case["name"] = "model.layers.2.mlp.c_fc.weight" if conv1d else "model.layers.2.mlp.up_proj.weight"
        in_dim = shape[0] if conv1d else shape[1]
        case["sq"] = [torch.rand(in_dim, generator=gen) for _ in range(K)]
        extra["input_sq_mean"] = [s.view((-1, 1) if conv1d else (1, -1)) for s in case["sq"]]
        param_kind = ParamKind.LINEAR
    elif kind == "embedding":
        case["name"] = "model.embed_tokens.weight"
        param_kind = ParamKind.EMBEDDING
        if counts:
            case["counts"] = torch.randint(0, 4, (shape[0],), generator=gen).float()
            extra["token_counts"] = case["counts"].view(-1, 1)
    else:
        case["name"] = "model.layers.2.post_attention_layernorm.weight"
        param_kind = ParamKind.OTHER
    case["task"] = TensorTask.from_tensors(
        case["name"], base, ckpts, kind=param_kind, block_index=block, seed=seed, **extra
    )
    return case


KINDS = {
    "linear": {"kind": "linear"},
    "conv1d": {"kind": "linear", "conv1d": True},
    "embedding_random": {"kind": "embedding"},
    "embedding_token_frequency": {"kind": "embedding", "counts": True},
    "norm_or_bias": {"kind": "other"},
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("params", "ratios"),
    [({}, [1 / 3] * 3), ({"ratios": [0.4, 0.45, 0.1]}, [0.4, 0.45, 0.1]), ({"ratios": [0.3, 0.0, 0.25]}, None)],
)
@pytest.mark.parametrize("block", [None, 0, 1, 5])
def test_agrees_with_brute_force_on_every_kind(kind, params, ratios, block):
    ratios = ratios or params["ratios"]
    case = make_case(block=block, seed=block or 0, **KINDS[kind])
    embedding_saliency = "token_frequency" if case["counts"] is not None else "random"
    method = build_method("obim", {**params, "embedding_saliency": embedding_saliency}, num_models=K)
    out = method.merge(case["task"])
    expected, owner = plain_obim(case, ratios, block)
    assert torch.equal(out.tensor, expected)
    numel = case["base"].numel()
    assert out.owned == [owner.count(k) for k in range(K)]
    if math.isclose(sum(ratios), 1.0):
        assert -1 not in owner, "shares summing to 1 cover every position"
    else:
        free = torch.tensor([o < 0 for o in owner]).view(case["base"].shape)
        assert torch.equal(out.tensor[free], case["base"][free]), "positions outside M keep the base"
        assert int(free.sum()) == numel - math.floor(numel * sum(ratios) + 0.5)


def test_exact_counts_disjoint_masks_and_theta_k_at_owned_positions():
    case = make_case(shape=(13, 11))
    ratios = [0.3, 0.25, 0.15]
    out = build_method("obim", {"ratios": ratios, "order": "given"}, num_models=K).merge(case["task"])
    base, ckpts = case["base"], case["ckpts"]
    from_k = [(out.tensor == c) & (c != base) for c in ckpts]
    assert [int(m.sum()) for m in from_k] == out.owned == plain_counts(base.numel(), ratios)
    for i in range(K):
        for j in range(i + 1, K):
            assert not bool((from_k[i] & from_k[j]).any())
    untouched = ~(from_k[0] | from_k[1] | from_k[2])
    assert torch.equal(out.tensor[untouched], base[untouched])


def test_rotation_puts_a_different_checkpoint_first_in_each_block():
    # all checkpoints change the same positions by the same magnitude, so they compete for the
    # same top positions and the first in the order wins them
    pattern = torch.arange(1, 61, dtype=torch.float32).view(6, 10)
    base = torch.zeros(6, 10)
    ckpts = [pattern * (1 if k % 2 else -1) + 0.001 * k for k in range(K)]
    firsts = []
    for block in range(4):
        task = TensorTask.from_tensors(
            "model.layers.0.mlp.up_proj.weight",
            base,
            ckpts,
            kind=ParamKind.LINEAR,
            block_index=block,
            input_sq_mean=[torch.ones(1, 10)] * K,
        )
        out = build_method("obim", {"ratios": [0.2, 0.2, 0.2]}, num_models=K).merge(task)
        firsts.append(next(k for k in range(K) if out.tensor[5, 9] == ckpts[k][5, 9]))
    assert firsts == [0, 1, 2, 0]


def test_priority_order_decides_who_goes_first():
    case = make_case(block=1)  # rotation would put checkpoint 1 first
    method = build_method("obim", {"order": "priority", "priority": [0, 0, 9]}, num_models=K)
    out = method.merge(case["task"])
    first = torch.zeros(case["base"].numel(), dtype=torch.bool)
    scores = torch.tensor(plain_scores(case, 2))
    first[torch.sort(scores, descending=True, stable=True).indices[:20]] = True
    assert torch.equal(out.tensor.flatten()[first], case["ckpts"][2].flatten()[first])
    assert method.describe_tensor(1) == "order [2, 0, 1]"


@pytest.mark.parametrize("kind", ["embedding_random", "norm_or_bias"])
def test_random_saliency_tensors_follow_the_seed(kind):
    def merged(seed, block=None):
        case = make_case(seed=0, block=block, **KINDS[kind])
        case["task"].seed = seed
        return build_method("obim", {}, num_models=K).merge(case["task"]).tensor

    assert torch.equal(merged(0), merged(0))
    assert not torch.equal(merged(0), merged(1))


def test_linear_weights_do_not_depend_on_the_seed():
    def merged(seed):
        case = make_case()
        case["task"].seed = seed
        return build_method("obim", {}, num_models=K).merge(case["task"]).tensor

    assert torch.equal(merged(0), merged(12345))


def test_linear_without_statistics_is_a_clear_error():
    case = make_case()
    case["task"].input_sq_mean = None
    with pytest.raises(ValueError, match=r"up_proj\.weight.*activation statistics"):
        build_method("obim", {}, num_models=K).merge(case["task"])


def test_single_checkpoint_with_the_full_share_is_that_checkpoint():
    case = make_case()
    task = TensorTask.from_tensors("model.norm.weight", case["base"], case["ckpts"][:1])
    assert torch.equal(build_method("obim", {}, num_models=1).merge(task).tensor, case["ckpts"][0])


def test_registry_entry_and_shares_within_tolerance():
    assert get_method("obim") is OBIM and OBIM.needs_activation_stats
    method = build_method("obim", {"ratios": [0.3333334] * 3}, num_models=K)  # sums to 1.0000002
    case = make_case(kind="other")
    assert sum(method.merge(case["task"]).owned) == case["base"].numel()
    assert build_method("obim", {}, num_models=4).ratios == [0.25] * 4


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"ratios": [0.5, 0.5]}, "ratios has 2 value(s) [0.5, 0.5] but there are 3 checkpoints"),
        ({"ratios": [0.5, 0.4, 0.3]}, "sum to 1.2 > 1"),
        ({"ratios": [-0.1, 0.5, 0.5]}, "must lie in [0, 1], got [-0.1, 0.5, 0.5]"),
        ({"ratios": [float("nan"), 0.5, 0.1]}, "must lie in [0, 1]"),
        ({"order": "sideways"}, "order"),
        ({"order": "priority"}, "one finite priority per checkpoint (3)"),
        ({"order": "priority", "priority": [1, 2]}, "got [1.0, 2.0]"),
        ({"priority": [1, 2, 3]}, "only used with order 'priority'"),
        ({"embedding_saliency": "magnitude"}, "embedding_saliency"),
        ({"ratio": [0.3]}, "Parameters it accepts"),
    ],
)
def test_parameter_errors(params, fragment):
    with pytest.raises(ConfigError) as info:
        build_method("obim", params, num_models=K)
    assert fragment in str(info.value)
