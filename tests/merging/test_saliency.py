"""Saliency functions: OBM's mean(x²)·δ² (eq. 5) with the right orientation, and seeded random scores."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.merging.saliency import (
    magnitude_saliency,
    obm_saliency,
    random_saliency,
    token_frequency_saliency,
)
from obim_trainer.merging.task import ParamKind, TensorTask

OUT, IN = 3, 5


def linear_task(conv1d: bool = False, seed: int = 0, **kwargs) -> tuple[TensorTask, list[torch.Tensor]]:
    """A Linear weight [out, in] (or a GPT-2 Conv1D weight stored [in, out]) with per-input statistics."""
    gen = torch.Generator().manual_seed(seed)
    shape = (IN, OUT) if conv1d else (OUT, IN)
    base = torch.randn(shape, generator=gen)
    ckpts = [base + torch.randn(shape, generator=gen) for _ in range(2)]
    sq = [torch.rand(IN, generator=gen).view((IN, 1) if conv1d else (1, IN)) for _ in range(2)]
    kwargs.setdefault("input_sq_mean", sq)
    task = TensorTask.from_tensors("model.layers.0.mlp.up_proj.weight", base, ckpts, kind=ParamKind.LINEAR, **kwargs)
    return task, [s.flatten() for s in sq]


@pytest.mark.parametrize("conv1d", [False, True])
def test_obm_weights_each_input_feature_by_its_activation_statistic(conv1d):
    task, sq = linear_task(conv1d)
    for k in range(2):
        delta = task.delta(k)
        scores = obm_saliency(task, k, delta.clone)
        for i in range(OUT):
            for j in range(IN):  # output row i, input feature j
                d = delta[j, i] if conv1d else delta[i, j]
                s = scores[j, i] if conv1d else scores[i, j]
                assert s == sq[k][j] * (d * d), (k, i, j)


def test_obm_without_or_with_mismatched_statistics_names_the_tensor():
    task, _ = linear_task(input_sq_mean=None)
    with pytest.raises(ValueError, match=r"up_proj\.weight.*activation statistics of checkpoint 1"):
        obm_saliency(task, 1, lambda: task.delta(1))
    task, _ = linear_task(input_sq_mean=[torch.ones(1, IN), None])
    with pytest.raises(ValueError, match="checkpoint 1"):
        obm_saliency(task, 1, lambda: task.delta(1))
    task, _ = linear_task(input_sq_mean=[torch.ones(1, OUT)] * 2)  # statistics of the output side
    with pytest.raises(ValueError, match=r"up_proj\.weight has shape \(1, 3\).*\(3, 5\)"):
        obm_saliency(task, 0, lambda: task.delta(0))


def test_a_linear_map_no_token_reached_is_scored_at_random_for_that_checkpoint_only():
    # an MoE expert the router never chose in checkpoint 0: its statistics are all zero
    sq = [torch.zeros(1, IN), torch.rand(1, IN)]
    task, _ = linear_task(input_sq_mean=sq)
    for k in range(2):
        delta = task.delta(k)
        scores = obm_saliency(task, k, delta.clone).clone()
        expected = random_saliency(task, k, never) if k == 0 else delta.square() * sq[k]
        torch.testing.assert_close(scores, expected)


def other_task(name: str = "model.norm.weight", seed: int = 0, kind: ParamKind = ParamKind.OTHER, **kwargs):
    gen = torch.Generator().manual_seed(99)
    base = torch.randn(64, generator=gen)
    return TensorTask.from_tensors(name, base, [base + 1, base - 1], kind=kind, seed=seed, **kwargs)


def never() -> torch.Tensor:
    raise AssertionError("random saliency computed the task vector it does not need")


def test_random_saliency_is_seeded_by_seed_name_and_checkpoint():
    task = other_task()
    first = random_saliency(task, 0, lambda: task.delta(0))
    assert torch.equal(first, random_saliency(other_task(), 0, never))
    assert bool((first >= 0).all()) and bool((first < 1).all())
    assert not torch.equal(first, random_saliency(task, 1, lambda: task.delta(1)))
    assert not torch.equal(first, random_saliency(other_task(seed=1), 0, lambda: task.delta(0)))
    assert not torch.equal(first, random_saliency(other_task("model.layers.0.input_layernorm.weight"), 0, never))


@pytest.mark.parametrize("kind", [ParamKind.OTHER, ParamKind.EMBEDDING])
def test_obm_uses_random_pruning_for_everything_but_linear_weights(kind):
    task = other_task(kind=kind)
    for k in range(2):
        assert torch.equal(obm_saliency(task, k, never), random_saliency(task, k, never))


def test_token_frequency_scores_embedding_rows_by_count_times_delta_squared():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=gen)
    ckpt = base + torch.randn(6, 4, generator=gen)
    counts = torch.tensor([5.0, 0.0, 1.0, 7.0, 2.0, 3.0]).view(-1, 1)
    task = TensorTask.from_tensors(
        "model.embed_tokens.weight", base, [ckpt], kind=ParamKind.EMBEDDING, token_counts=counts
    )
    delta = task.delta(0)
    scores = token_frequency_saliency(task, 0, delta.clone)
    for row in range(6):
        for col in range(4):
            assert scores[row, col] == counts[row, 0] * (delta[row, col] * delta[row, col])
    task.token_counts = torch.ones(7, 1)  # another vocabulary
    with pytest.raises(ValueError, match=r"token counts for model\.embed_tokens\.weight"):
        token_frequency_saliency(task, 0, lambda: task.delta(0))


def test_token_frequency_falls_back_to_obm():
    embedding = other_task(kind=ParamKind.EMBEDDING)  # no counts: random, as the paper
    assert torch.equal(token_frequency_saliency(embedding, 0, never), random_saliency(embedding, 0, never))
    task, _ = linear_task()
    scores = obm_saliency(task, 1, lambda: task.delta(1))
    assert torch.equal(token_frequency_saliency(task, 1, lambda: task.delta(1)), scores)


def test_magnitude_is_the_absolute_delta():
    delta = torch.tensor([[-2.0, 0.5], [0.0, -0.25]])
    assert magnitude_saliency(other_task(), 0, delta.clone).tolist() == [[2.0, 0.5], [0.0, 0.25]]
