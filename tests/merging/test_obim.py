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


def fisher_case(kind="linear", block=None, shape=(12, 10), seed=3):
    """make_case plus Fisher diagonals: the base's (old language) and each checkpoint's (new language)."""
    case = make_case(kind=kind, block=block, seed=seed, shape=shape)
    gen = torch.Generator().manual_seed(seed + 7)
    base_shape = case["base"].shape
    case["f_old"] = torch.rand(base_shape, generator=gen) ** 2
    case["f_old"].view(-1)[:5] = 0.0  # parameters the old language never uses
    case["f_new"] = [torch.rand(base_shape, generator=gen) for _ in range(K)]
    case["task"].base_fisher, case["task"].checkpoint_fishers = case["f_old"], case["f_new"]
    return case


def plain_forgetting_scores(case, k, gamma):
    """δ²·F_new/(F_old + 1e-3·mean F_old)^γ, float32 as the method computes it."""
    delta = case["ckpts"][k] - case["base"]
    eps = 1e-3 * float(case["f_old"].mean())
    return (delta * delta * case["f_new"][k] / (case["f_old"] + eps) ** gamma).flatten().tolist()


def test_forgetting_aware_score_on_hand_made_tensors():
    from obim_trainer.merging.saliency import forgetting_aware_saliency

    base = torch.zeros(2, 2)
    theta = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    f_old = torch.tensor([[1.0, 0.0], [3.0, 4.0]])  # mean 2, ε = 0.002
    f_new = torch.tensor([[2.0, 1.0], [4.0, 0.0]])
    task = TensorTask.from_tensors("w", base, [theta], base_fisher=f_old, checkpoint_fishers=[f_new])
    scores = forgetting_aware_saliency(1.0)(task, 0, lambda: theta - base)
    expected = torch.tensor([[1 * 2 / 1.002, 4 * 1 / 0.002], [0.25 * 4 / 3.002, 0.0]])
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0)
    squared = forgetting_aware_saliency(2.0)(task, 0, lambda: theta - base)
    torch.testing.assert_close(squared[0, 0], torch.tensor(2 / 1.002**2), rtol=1e-6, atol=0)
    plain = forgetting_aware_saliency(0.0)(task, 0, lambda: theta - base)  # γ = 0: OBM with the Fisher as Hessian
    torch.testing.assert_close(plain, (theta - base) ** 2 * f_new, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "embedding", "other"])
@pytest.mark.parametrize(("gamma", "ratios"), [(1.0, None), (0.5, [0.3, 0.2, 0.1]), (2.0, [0.2, 0.2, 0.2])])
def test_forgetting_aware_selection_is_obims_on_its_scores(kind, gamma, ratios):
    """Iterative, disjoint, rotating, exact counts: Algorithm 1 run on the forgetting-aware scores."""
    block = 1
    case = fisher_case(kind=kind, block=block)
    params = {"saliency": "forgetting_aware", "gamma": gamma, **({"ratios": ratios} if ratios else {})}
    out = build_method("obim", params, num_models=K).merge(case["task"])
    ratios = ratios or [1 / K] * K
    base = case["base"].flatten().tolist()
    result, owner = list(base), [-1] * len(base)
    for k, count in zip([1, 2, 0], plain_counts(len(base), [ratios[k] for k in [1, 2, 0]]), strict=True):
        s = plain_forgetting_scores(case, k, gamma)
        for i in sorted((i for i in range(len(base)) if owner[i] < 0), key=lambda i: (-s[i], i))[:count]:
            owner[i], result[i] = k, case["ckpts"][k].flatten()[i].item()
    assert torch.equal(out.tensor, torch.tensor(result).view(case["base"].shape))
    assert out.owned == [owner.count(k) for k in range(K)]
    obm = build_method("obim", {k: v for k, v in params.items() if k == "ratios"}, num_models=K)
    if kind == "linear":
        assert not torch.equal(obm.merge(case["task"]).tensor, out.tensor), "the Fishers change the selection"


def test_forgetting_aware_prefers_changes_the_old_language_does_not_feel():
    """Same δ and F_new everywhere: the positions with the smallest old-language Fisher are kept."""
    base = torch.zeros(10)
    ckpt = torch.ones(10)
    f_old = torch.arange(10, dtype=torch.float32).flip(0)  # position 9 is free for the old language
    task = TensorTask.from_tensors(
        "model.norm.weight", base, [ckpt], base_fisher=f_old, checkpoint_fishers=[torch.ones(10)]
    )
    out = build_method("obim", {"saliency": "forgetting_aware", "ratios": [0.3]}, num_models=1).merge(task)
    assert out.tensor.tolist() == [0.0] * 7 + [1.0] * 3


def test_obm_default_is_unchanged_by_the_new_parameters_and_statistics():
    case = fisher_case()
    default = build_method("obim", {}, num_models=K).merge(case["task"]).tensor
    explicit = build_method("obim", {"saliency": "obm", "gamma": 3.0}, num_models=K).merge(case["task"]).tensor
    expected, _ = plain_obim(case, [1 / K] * K, None)  # the brute force that ignores Fishers
    assert torch.equal(default, expected) and torch.equal(explicit, expected)


def test_statistics_needed_by_each_saliency():
    from obim_trainer.merging.registry import StatisticsNeeds

    assert build_method("obim", {}, num_models=K).statistics() == StatisticsNeeds(activations=True)
    fisher = build_method("obim", {"saliency": "forgetting_aware"}, num_models=K).statistics()
    assert fisher == StatisticsNeeds(fishers=True, per_language=True)
    assert build_method("ties_im", {}, num_models=K).statistics() == StatisticsNeeds()


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"saliency": "forgetting_aware", "gamma": -1.0}, "gamma: Input should be greater than or equal to 0"),
        ({"saliency": "fisher"}, "saliency: Input should be 'obm' or 'forgetting_aware'"),
        ({"saliency": "forgetting_aware", "embedding_saliency": "token_frequency"}, "drop one of them"),
    ],
)
def test_forgetting_aware_parameter_errors(params, fragment):
    with pytest.raises(ConfigError) as info:
        build_method("obim", params, num_models=K)
    assert fragment in str(info.value)


def test_forgetting_aware_without_fishers_is_a_clear_error():
    case = make_case()
    with pytest.raises(ValueError, match=r"up_proj\.weight needs the base's Fisher"):
        build_method("obim", {"saliency": "forgetting_aware"}, num_models=K).merge(case["task"])
