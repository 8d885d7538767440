"""Iterative merging (Algorithm 1 / eq. 8) with given scores, checked against a plain greedy loop."""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from obim_trainer.merging.iterative import iterative_merge
from obim_trainer.merging.task import TensorTask, Workspace


def plain_counts(numel: int, ratios: list[float]) -> list[int]:
    """Largest remainders, written out: floors, then one more for the largest fractional parts."""
    total = math.floor(numel * sum(ratios) + 0.5)
    counts = [math.floor(r * numel) for r in ratios]
    for i in sorted(range(len(ratios)), key=lambda i: (-(ratios[i] * numel - counts[i]), i))[: total - sum(counts)]:
        counts[i] += 1
    return counts


def plain_iterative(base, ckpts, scores, ratios, order):
    """Algorithm 1 with Python lists: each checkpoint in order takes its best free positions."""
    numel = base.numel()
    result = base.flatten().tolist()
    owner = [-1] * numel
    for k, count in zip(order, plain_counts(numel, [ratios[k] for k in order]), strict=True):
        s = scores[k].flatten().tolist()
        free = sorted((i for i in range(numel) if owner[i] < 0), key=lambda i: (-s[i], i))
        theta = ckpts[k].flatten().tolist()
        for i in free[:count]:
            owner[i] = k
            result[i] = theta[i]
    return torch.tensor(result).view(base.shape), owner


def given_scores(scores):
    """A saliency function that returns fixed scores per checkpoint and records who was scored."""

    def saliency(task, k, delta):
        saliency.calls.append(k)
        return scores[k].clone()

    saliency.calls = []
    return saliency


def family(k=3, shape=(7, 9), seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    ckpts = [base + torch.randn(shape, generator=gen) for _ in range(k)]
    scores = [torch.randint(0, 5, shape, generator=gen).float() for _ in range(k)]  # heavy ties
    return base, ckpts, scores


@pytest.mark.parametrize(
    ("ratios", "order"),
    [
        ([1 / 3] * 3, [0, 1, 2]),
        ([1 / 3] * 3, [2, 0, 1]),
        ([0.4, 0.45, 0.1], [1, 2, 0]),
        ([0.5, 0.0, 0.3], [0, 1, 2]),
        ([0.2, 0.2, 0.2], [2, 1, 0]),
        ([0.6, 0.0, 0.4], [1, 0]),  # a subset of the checkpoints
    ],
)
def test_agrees_with_the_plain_greedy_loop(ratios, order):
    for seed in range(3):
        base, ckpts, scores = family(seed=seed)
        task = TensorTask.from_tensors("w", base, ckpts)
        out = iterative_merge(task, ratios, order, given_scores(scores))
        expected, owner = plain_iterative(base, ckpts, scores, ratios, order)
        assert torch.equal(out.tensor, expected)
        assert out.owned == [owner.count(k) for k in range(3)], "owned is indexed by checkpoint, not by order"
        counts = dict(zip(order, plain_counts(base.numel(), [ratios[k] for k in order]), strict=True))
        assert out.owned == [counts.get(k, 0) for k in range(3)]
        if math.isclose(sum(ratios[k] for k in order), 1.0):
            assert -1 not in owner, "shares summing to 1 cover every position"


def test_saliency_sees_the_task_vector_and_the_last_checkpoint_takes_the_rest_unscored():
    base, ckpts, scores = family()
    seen = {}

    def saliency(task, k, delta):
        seen[k] = delta().clone()
        return scores[k].clone()

    task = TensorTask.from_tensors("w", base, ckpts)
    out = iterative_merge(task, [1 / 3] * 3, [1, 2, 0], saliency)
    assert sorted(seen) == [1, 2], "checkpoint 0 goes last and owns every position still free"
    for k, delta in seen.items():
        assert torch.equal(delta, ckpts[k] - base)
    assert out.owned == [21, 21, 21]


def test_owned_positions_hold_theta_k_itself_not_base_plus_delta():
    base = torch.full((4, 4), 1e7)
    ckpts = [torch.linspace(0.1, 1.6, 16).view(4, 4), torch.linspace(2.1, 3.6, 16).view(4, 4)]
    assert not torch.equal(base + (ckpts[0] - base), ckpts[0]), "the sum would round"
    scores = [torch.arange(16.0).view(4, 4), torch.arange(16.0).flip(0).view(4, 4)]
    out = iterative_merge(TensorTask.from_tensors("w", base, ckpts), [0.5, 0.5], [0, 1], given_scores(scores))
    from_first = out.tensor == ckpts[0]
    assert int(from_first.sum()) == 8
    assert torch.equal(out.tensor[~from_first], ckpts[1][~from_first])


def test_each_checkpoint_is_loaded_once_and_only_the_result_and_one_more_are_held():
    base, ckpts, scores = family(k=4)
    loads, alive = [], []

    def load(k):
        assert all(ref() is None for ref in alive[1:]), "a checkpoint other than the first (the result) is held"
        loads.append(k)
        theta = ckpts[k].clone()
        alive.append(weakref.ref(theta))
        return theta

    base_stored = base.clone()
    task = TensorTask(name="w", base_stored=base_stored, _load=load, num_models=4)
    out = iterative_merge(task, [0.3, 0.0, 0.3, 0.3], [3, 2, 1, 0], given_scores(scores))
    assert loads == [3, 2, 0], "a checkpoint with no share is never read"
    assert alive[0]() is out.tensor, "the first checkpoint's tensor becomes the result: no copy of the base"
    expected, _ = plain_iterative(base, ckpts, scores, [0.3, 0.0, 0.3, 0.3], [3, 2, 1, 0])
    assert torch.equal(out.tensor, expected), "positions nobody owns (10%) hold the base"
    assert torch.equal(base_stored, base), "the base is only read"
    assert task.base_float32 is None, "no float32 copy of the base was made"


def test_only_the_first_checkpoint_is_taken_over_the_others_are_read_in_place():
    """In a sweep the merges share their inputs: iterative merging writes into the first checkpoint it loads
    (its result) and only reads the others, so only that one needs a copy."""
    base, ckpts, scores = family(k=3)
    shared = [c.clone() for c in ckpts]
    taken: list[int] = []

    def load(k):
        taken.append(k)
        return shared[k].clone()

    task = TensorTask(name="w", base_stored=base.clone(), _load=load, _view=shared.__getitem__, num_models=3)
    out = iterative_merge(task, [0.3, 0.3, 0.3], [2, 0, 1], given_scores(scores))
    assert taken == [2], "only the checkpoint that becomes the result is taken over"
    assert all(torch.equal(s, c) for s, c in zip(shared, ckpts, strict=True)), "the shared inputs are unchanged"
    expected, _ = plain_iterative(base, ckpts, scores, [0.3, 0.3, 0.3], [2, 0, 1])
    assert torch.equal(out.tensor, expected)


def test_partial_shares_leave_the_base_elsewhere():
    base, ckpts, scores = family(shape=(11, 13))
    out = iterative_merge(TensorTask.from_tensors("w", base, ckpts), [0.1, 0.25, 0.15], [0, 1, 2], given_scores(scores))
    owned_by = [(out.tensor == c) & (c != base) for c in ckpts]
    untouched = ~(owned_by[0] | owned_by[1] | owned_by[2])
    assert [int(m.sum()) for m in owned_by] == out.owned == plain_counts(143, [0.1, 0.25, 0.15])
    assert torch.equal(out.tensor[untouched], base[untouched])
    assert int(untouched.sum()) == 143 - sum(out.owned)


def test_empty_tensor_and_bad_orders():
    task = TensorTask.from_tensors("w", torch.zeros(0, 4), [torch.zeros(0, 4)] * 2)
    out = iterative_merge(task, [0.5, 0.5], [0, 1], given_scores([torch.zeros(0, 4)] * 2))
    assert out.tensor.shape == (0, 4) and out.owned == [0, 0]
    for order in ([0, 0], [0, 2]):
        with pytest.raises(ValueError, match="distinct checkpoint indices"):
            iterative_merge(task, [0.5, 0.5], order, given_scores([]))


def test_large_bf16_tensors_through_a_reused_workspace_agree_with_the_plain_loop():
    """Above 65536 positions the selection brackets its threshold from a sample, buffers are reused from
    tensor to tensor (growing and shrinking), and bf16 values are copied bit for bit."""
    workspace = Workspace()
    for shape, seed in (((300, 250), 0), ((40, 30), 1), ((320, 260), 2)):
        base, ckpts, scores = family(shape=shape, seed=seed)
        base, ckpts = base.bfloat16(), [c.bfloat16() for c in ckpts]
        task = TensorTask.from_tensors("w", base, ckpts, workspace=workspace)
        out = iterative_merge(task, [1 / 3] * 3, [1, 0, 2], given_scores(scores))
        expected, _ = plain_iterative(base.float(), [c.float() for c in ckpts], scores, [1 / 3] * 3, [1, 0, 2])
        assert out.tensor.dtype == torch.bfloat16
        assert torch.equal(out.tensor.float(), expected), shape


SHARE_SETS = [
    [1 / 3] * 3,
    [0.8 / 3] * 3,
    [0.6 / 3] * 3,
    [0.5, 0.0, 0.3],
    [0.0, 0.0, 0.0],
    [0.1, 0.7, 0.2],
    [1.0, 0.0, 0.0],  # all from the last checkpoint in the order: its result is never written into
]


@pytest.mark.parametrize("blank", [False, True])
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtypes", [("bf16",) * 3, ("bf16", "f32", "bf16")])
def test_merges_differing_in_shares_made_together_equal_each_made_alone(monkeypatch, native, dtypes, blank):
    """A sweep's OBIM merges of one tensor share each step's scores; every output is its own merge's, bit for
    bit (fused loops or torch; checkpoints stored in one dtype or in several, so results change dtype midway;
    results taken over from the first checkpoint, or, as in the engine's sweeps, NaN-filled buffers that the
    merge must fill entirely)."""
    from obim_trainer.merging import fused_take
    from obim_trainer.merging.iterative import iterative_merge_many

    if not native:
        monkeypatch.setattr(fused_take, "native_library", lambda: None)
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(300, 256, generator=gen).to(torch.bfloat16)  # above the fused loops' minimum size
    kinds = {"bf16": torch.bfloat16, "f32": torch.float32}
    ckpts = [(base.float() + torch.randn(300, 256, generator=gen)).to(kinds[d]) for d in dtypes]
    scores = [torch.randint(0, 50, (300, 256), generator=gen).float() for _ in ckpts]  # ties at every threshold
    order = [1, 2, 0]
    make = lambda: TensorTask.from_tensors("w", base, ckpts, workspace=Workspace())  # noqa: E731
    saliency = given_scores(scores)
    task = make()
    if blank:
        task._result_for = lambda k: (torch.full_like(ckpts[k], float("nan")), False)
    together = iterative_merge_many(task, SHARE_SETS, order, saliency)
    if len(set(dtypes)) == 1:
        assert saliency.calls == order, "each checkpoint scored once for all the merges"
    else:  # a merge starting at a bf16 checkpoint keeps bf16 while the others hold float32 since checkpoint 1
        assert saliency.calls == [1, 2, 2, 0, 0], "once per step and result dtype"
    for shares, out in zip(SHARE_SETS, together, strict=True):
        alone = iterative_merge(make(), shares, order, given_scores(scores))
        assert out.tensor.dtype == alone.tensor.dtype and out.owned == alone.owned, shares
        assert torch.equal(out.tensor.view(torch.uint8), alone.tensor.view(torch.uint8)), shares
