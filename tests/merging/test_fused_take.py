"""The fused native step of iterative merging selects exactly what the torch path selects, bit for bit."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.merging import fused_take
from obim_trainer.merging.iterative import iterative_merge
from obim_trainer.merging.native_library import native_library
from obim_trainer.merging.order import merge_order
from obim_trainer.merging.random_scores import RandomScores, uniform_at
from obim_trainer.merging.saliency import TaskVector, obm_saliency, random_saliency
from obim_trainer.merging.task import ParamKind, TensorTask, Workspace
from obim_trainer.merging.topk import select_top

ROWS, COLS = 384, 320  # 122,880 positions: above the sampled-selection minimum
INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

pytestmark = pytest.mark.skipif(native_library() is None, reason="no C++ compiler: the fused path is off")


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(INTS[tensor.element_size()])


def take_top(scores, count, free, num_free, result, theta, free_out):
    """One pick of :func:`fused_take.take_top_many`: its new free mask, or ``None`` when the fused path declined."""
    return fused_take.take_top_many(scores, [fused_take.Pick(count, free, num_free, result, free_out)], theta)[0]


def torch_take(scores, count, free, result, theta):
    """The torch path's step: select_top, a masked copy, the free mask updated."""
    mask = select_top(scores, count, free)
    merged = torch.where(mask, theta, result)
    left = ~mask if free is None else free & ~mask
    return merged, left


def scores_with(kind: str, shape, gen) -> torch.Tensor:
    if kind == "ties":
        return torch.randint(0, 40, shape, generator=gen).float()  # heavy ties at the threshold
    if kind == "zeros":
        scores = torch.rand(shape, generator=gen)
        scores[torch.rand(shape, generator=gen) < 0.1] = 0.0  # a tie group at zero
        return scores
    return torch.rand(shape, generator=gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["uniform", "ties", "zeros"])
@pytest.mark.parametrize("with_free", [False, True])
def test_given_scores_select_the_torch_paths_positions(dtype, kind, with_free):
    gen = torch.Generator().manual_seed(hash((str(dtype), kind, with_free)) % 2**31)
    scores = scores_with(kind, (ROWS, COLS), gen)
    free = torch.rand(ROWS, COLS, generator=gen) > 0.35 if with_free else None
    num_free = scores.numel() if free is None else int(free.sum())
    result = torch.randn(ROWS, COLS, generator=gen).to(dtype)
    theta = torch.randn(ROWS, COLS, generator=gen).to(dtype)
    for count in (1, num_free // 3, num_free // 2, num_free - 1):
        expected, expected_free = torch_take(scores, count, free, result, theta)
        got = result.clone()
        free_out = torch.empty(ROWS, COLS, dtype=torch.bool)
        left = take_top(scores, count, free, num_free, got, theta, free_out)
        assert left is free_out, (kind, count)
        assert torch.equal(bits(got), bits(expected)), (kind, count)
        assert torch.equal(left, expected_free), (kind, count)
        assert int((~left).sum()) - (0 if free is None else int((~free).sum())) == count


def obm_task(theta_dtype: torch.dtype, per_row: bool, seed: int = 0) -> TensorTask:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(ROWS, COLS, generator=gen).to(theta_dtype)
    ckpts = []
    for _ in range(3):
        ckpt = base.clone()
        changed = torch.rand(ROWS, COLS, generator=gen) < 0.7  # 30% unchanged: ties at score 0
        ckpt[changed] += (0.01 * torch.randn(ROWS, COLS, generator=gen)).to(theta_dtype)[changed]
        ckpts.append(ckpt)
    shape = (ROWS, 1) if per_row else (1, COLS)
    stats = [torch.rand(shape, generator=gen) for _ in range(3)]
    return TensorTask.from_tensors(
        "model.layers.2.mlp.up_proj.weight", base, ckpts, kind=ParamKind.LINEAR, input_sq_mean=stats,
        block_index=2, workspace=Workspace(),
    )  # fmt: skip


@pytest.mark.parametrize("theta_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_row", [False, True])
def test_obm_scores_computed_inside_the_loops_round_like_torch(theta_dtype, per_row):
    task = obm_task(theta_dtype, per_row)
    theta = task.checkpoint_stored(1)
    stored = theta.clone()
    lazy = obm_saliency(task, 1, TaskVector(task, theta))
    assert fused_take._source(lazy).given is None, "OBM scores are read in place, not materialized"
    scores = lazy.materialize().clone()
    free = torch.rand(ROWS, COLS, generator=torch.Generator().manual_seed(3)) > 0.4
    num_free = int(free.sum())
    result = task.base_stored.clone()
    for count in (num_free // 3, num_free // 2):  # thresholds above the 30% that tie at zero
        expected, expected_free = torch_take(scores, count, free, result, theta)
        got = result.clone()
        left = take_top(lazy, count, free, num_free, got, theta, torch.empty_like(free))
        assert left is not None
        assert torch.equal(bits(got), bits(expected))
        assert torch.equal(left, expected_free)
    assert torch.equal(bits(theta), bits(stored)), "θ_k is read, never written"


@pytest.mark.parametrize("family", ["linear-bf16", "linear-f32-conv1d", "embedding-random"])
def test_whole_iterative_merges_equal_the_torch_path(monkeypatch, family):
    """Algorithm 1 end to end, with and without the fused loops, on one and two threads."""
    if family == "embedding-random":
        gen = torch.Generator().manual_seed(8)
        base = torch.randn(ROWS, COLS, generator=gen).to(torch.bfloat16)
        ckpts = [(base.float() + torch.randn(ROWS, COLS, generator=gen)).to(torch.bfloat16) for _ in range(3)]
        make = lambda: TensorTask.from_tensors(  # noqa: E731
            "model.embed_tokens.weight", base, ckpts, kind=ParamKind.EMBEDDING, seed=5, workspace=Workspace()
        )
        saliency = random_saliency
    else:
        make = lambda: obm_task(torch.bfloat16 if family == "linear-bf16" else torch.float32, "conv1d" in family)  # noqa: E731
        saliency = obm_saliency
    ratios, order = [0.45, 0.25, 0.3], merge_order(3, 2, "rotation")
    fused = iterative_merge(make(), ratios, order, saliency)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = iterative_merge(make(), ratios, order, saliency)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(fused_take, "native_library", lambda: None)
    reference = iterative_merge(make(), ratios, order, saliency)
    assert torch.equal(bits(fused.tensor), bits(reference.tensor))
    assert torch.equal(bits(one_thread.tensor), bits(reference.tensor))
    assert fused.owned == reference.owned


def test_a_misleading_sample_falls_back_and_nothing_is_written():
    gen = torch.Generator().manual_seed(5)
    scores = torch.rand(ROWS * COLS, generator=gen) + 1.0
    scores[:: fused_take._sample_stride(scores.numel(), scores.numel())] = 0.0  # the sample sees only these
    result = torch.zeros(ROWS * COLS)
    theta = torch.ones(ROWS * COLS)
    free_out = torch.ones(ROWS * COLS, dtype=torch.bool)
    assert take_top(scores, scores.numel() // 2, None, scores.numel(), result, theta, free_out) is None
    assert not result.any() and free_out.all()


@pytest.mark.parametrize("share", [None, 10**9])
def test_candidates_beyond_the_buffer_fall_back(monkeypatch, share):
    """A tie group larger than the candidate buffer (most scores zero), or a tiny buffer: torch's turn."""
    if share is not None:
        monkeypatch.setattr(fused_take, "_CANDIDATE_SHARE", share)  # room for 4096 candidates only
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(ROWS * COLS, generator=gen)
    scores[torch.rand(ROWS * COLS, generator=gen) < 0.6] = 0.0
    result, theta = torch.zeros(ROWS * COLS), torch.ones(ROWS * COLS)
    out = torch.empty(ROWS * COLS, dtype=torch.bool)
    assert take_top(scores, scores.numel() // 2, None, scores.numel(), result, theta, out) is None
    assert not result.any()


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_nan_or_negative_scores_are_an_error(bad):
    scores = torch.rand(ROWS * COLS)
    scores[777] = bad
    result, theta = torch.zeros(ROWS * COLS), torch.ones(ROWS * COLS)
    with pytest.raises(ValueError, match="non-negative and not NaN"):
        take_top(scores, 100, None, scores.numel(), result, theta, torch.empty(ROWS * COLS, dtype=torch.bool))


def test_copy_where_copies_the_free_positions_bit_for_bit():
    gen = torch.Generator().manual_seed(2)
    free = torch.rand(1000, 77, generator=gen) > 0.5
    result = torch.randn(1000, 77, generator=gen).to(torch.bfloat16)
    theta = torch.randn(1000, 77, generator=gen).to(torch.bfloat16)
    expected = torch.where(free, theta, result)
    assert fused_take.copy_where(free, result, theta)
    assert torch.equal(bits(result), bits(expected))


def test_tensors_the_loops_cannot_read_are_left_to_torch():
    scores = torch.rand(ROWS, COLS)
    result, theta = torch.zeros(ROWS, COLS), torch.ones(ROWS, COLS)
    out = torch.empty(ROWS, COLS, dtype=torch.bool)
    assert take_top(scores.t(), 10, None, scores.numel(), result, theta, out) is None  # not contiguous
    assert take_top(scores, 10, None, scores.numel(), result, theta.double(), out) is None  # dtypes differ
    small = torch.rand(100)
    assert take_top(small, 10, None, 100, torch.zeros(100), torch.ones(100), torch.empty(100, dtype=bool)) is None
    assert not result.any()


def test_random_scores_hashed_in_the_loops_equal_the_torch_hash():
    """The loops hash random scores themselves: they select exactly what torch's hash of the same seed selects."""
    numel, seed = 300_000, 0x5DEECE66D_1234
    expected = uniform_at(seed, torch.arange(numel))
    hashed = RandomScores(seed, torch.Size([numel]), torch.device("cpu"))
    theta, result = torch.ones(numel), torch.zeros(numel)
    for count in (1, 1000, numel // 3, numel - 1):
        got = result.clone()
        left = take_top(hashed, count, None, numel, got, theta, torch.empty(numel, dtype=torch.bool))
        assert left is not None
        assert torch.equal(got.bool(), select_top(expected, count)), count
    assert 0.49 < float(expected.mean()) < 0.51 and float(expected.min()) >= 0.0 and float(expected.max()) < 1.0
    assert torch.unique(expected).numel() > 0.99 * numel, "24 random bits: few ties"
    assert not torch.equal(uniform_at(seed + 1, torch.arange(1000)), expected[:1000])


def test_several_picks_of_one_step_each_select_what_they_would_alone():
    """A sweep's merges at one step: own free masks, counts and results (one holding θ already), scored once."""
    gen = torch.Generator().manual_seed(11)
    scores = scores_with("ties", (ROWS, COLS), gen)
    theta = torch.randn(ROWS, COLS, generator=gen).to(torch.bfloat16)
    frees = [None, torch.rand(ROWS, COLS, generator=gen) > 0.3, torch.rand(ROWS, COLS, generator=gen) > 0.6]
    results = [None, torch.randn(ROWS, COLS, generator=gen).to(torch.bfloat16), torch.zeros(ROWS, COLS).bfloat16()]
    picks, expected = [], []
    for i, (free, result) in enumerate(zip(frees, results, strict=True)):
        num_free = scores.numel() if free is None else int(free.sum())
        count = num_free // (i + 2)
        alone_result, alone_free = torch_take(scores, count, free, theta if result is None else result, theta)
        expected.append((alone_result, alone_free))
        out = torch.empty(ROWS, COLS, dtype=torch.bool)
        picks.append(fused_take.Pick(count, free, num_free, None if result is None else result.clone(), out))
    made = fused_take.take_top_many(scores, picks, theta)
    for pick, left, (alone_result, alone_free) in zip(picks, made, expected, strict=True):
        assert left is pick.free_out
        assert torch.equal(left, alone_free)
        if pick.result is not None:
            assert torch.equal(bits(pick.result), bits(alone_result))


def test_a_pick_whose_bracket_misses_is_declined_alone():
    """One pick's sample misleads it (its sampled positions all score zero); the other pick is still made."""
    gen = torch.Generator().manual_seed(6)
    numel = ROWS * COLS
    scores = torch.rand(numel, generator=gen) + 1.0
    first_half = torch.arange(numel) < numel // 2
    sampled = torch.zeros(numel, dtype=torch.bool)
    sampled[:: fused_take._sample_stride(numel, numel)] = True
    scores[sampled & first_half] = 0.0
    theta = torch.ones(numel)
    picks = [
        fused_take.Pick(count, free, int(free.sum()), torch.zeros(numel), torch.empty(numel, dtype=torch.bool))
        for count, free in ((numel // 4, first_half), (100, ~first_half))
    ]
    made = fused_take.take_top_many(scores, picks, theta)
    assert made[0] is None and not picks[0].result.any()
    assert made[1] is picks[1].free_out and int(picks[1].result.sum()) == 100
    assert torch.equal(picks[1].result.bool(), select_top(scores, 100, ~first_half))
