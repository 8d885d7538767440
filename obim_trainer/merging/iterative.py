"""Iterative merging (IM): mutually exclusive selection of each checkpoint's most salient positions.

Algorithm 1 of the paper: the merged mask M starts empty; for k in the order O, the positions
already in M are removed from k's candidates, k takes the top n_k share of the tensor by its
saliency, and those positions join M. The merged tensor is θ_M = θ_B + Σ_k δ_k·mask_k (eq. 8).
The masks are disjoint, so no position is ever averaged and no checkpoint's change is diluted
by another's; positions outside M keep the base (Σ n_k ≤ 1, the footnote to eq. 8).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from obim_trainer.merging.fused_take import copy_where as fused_copy_where
from obim_trainer.merging.fused_take import take_top
from obim_trainer.merging.saliency import SaliencyFn, Scores, TaskVector, scores_tensor
from obim_trainer.merging.task import MergeOutput, TensorTask
from obim_trainer.merging.topk import apportion, select_top


def iterative_merge(
    task: TensorTask, ratios: Sequence[float], order: Sequence[int], saliency: SaliencyFn
) -> MergeOutput:
    """Merge one tensor by Algorithm 1 / eq. 8.

    Args:
        task: The tensor and lazy access to the checkpoints.
        ratios: Share n_k of the whole tensor for each checkpoint k (indexed by k, not by order).
        order: Checkpoint indices in merge order for this tensor.
        saliency: Scores of checkpoint k's positions (see :mod:`obim_trainer.merging.saliency`).

    Returns:
        The merged tensor and ``owned[k]`` = number of positions taken from checkpoint k, which
        is :func:`~obim_trainer.merging.topk.apportion` of the ratios in this order.

    Each checkpoint is loaded once, and only one at a time besides the first, in its stored dtype;
    only the first is taken over (the others are read in place, :meth:`TensorTask.checkpoint_view`).
    At owned positions θ_k itself is copied, which equals θ_B + δ_k without the rounding of that
    sum, so the result stays in the inputs' (promoted) dtype: no arithmetic touches it. The result
    starts as the first checkpoint's θ (its positions then need no copy), the others' positions are
    copied in, and positions nobody owns (Σ n_k < 1) get θ_B at the end; θ_B itself is only read.
    Scores are float32, computed in place by the fused loops or in one scratch buffer; the free
    mask and the selection's masks are bool scratch buffers. A checkpoint whose count equals the
    positions still free takes all of them without being scored.
    """
    if len(set(order)) != len(order) or not set(order) <= set(range(task.num_models)):
        raise ValueError(f"merge order {list(order)} must list distinct checkpoint indices < {task.num_models}")
    base = task.base_stored if task.base_stored is not None else task.base
    numel = base.numel()
    counts = apportion(numel, [ratios[k] for k in order])
    result: Tensor | None = None
    free: Tensor | None = None  # None: every position is free
    num_free = numel
    owned = [0] * task.num_models
    for k, count in zip(order, counts, strict=True):
        if count == 0:
            continue
        # only the first checkpoint becomes the result (is written into); the others are only read
        theta = task.checkpoint_stored(k) if result is None else task.checkpoint_view(k)
        dtype = torch.promote_types(base.dtype if result is None else result.dtype, theta.dtype)
        theta = theta.to(dtype)
        if result is None:
            result = theta  # a tensor this merge owns; the first checkpoint's positions already hold θ_k
        elif result.dtype != dtype:
            result = result.to(dtype)
        if count == num_free:
            if result is not theta:
                _take_rest(task, result, theta, free)
        else:
            scores = saliency(task, k, TaskVector(task, theta))
            free = _take_top(task, scores, count, free, num_free, None if result is theta else result, theta)
            del scores
        del theta
        num_free -= count
        owned[k] = count
    if result is None:
        return MergeOutput(tensor=base.clone(), owned=owned)
    if num_free:
        _take_rest(task, result, base.to(result.dtype), free)  # positions nobody owns keep θ_B
    return MergeOutput(tensor=result, owned=owned)


def _take_top(
    task: TensorTask,
    scores: Scores,
    count: int,
    free: Tensor | None,
    num_free: int,
    result: Tensor | None,
    theta: Tensor,
) -> Tensor:
    """result = θ_k at the ``count`` best free positions by ``scores``; returns the positions still free.

    ``result`` ``None``: θ_k is the result already, only the free mask changes. The fused native
    pass when it applies (:mod:`~obim_trainer.merging.fused_take`), else :func:`select_top` and a
    masked copy: the same positions either way.
    """
    free_out = task.scratch("free", torch.bool)
    fused = take_top(scores, count, free, num_free, result, theta, free_out, task.workspace)
    if fused is not None:
        return fused
    mask = select_top(scores_tensor(scores), count, free, num_available=num_free, scratch=_bool_scratch(task))
    if result is not None:
        _copy_where(task, result, theta, mask)
    if free is None:
        return torch.logical_not(mask, out=free_out)
    return free.bitwise_xor_(mask)  # mask ⊆ free


def _take_rest(task: TensorTask, result: Tensor, theta: Tensor, free: Tensor | None) -> None:
    """result = ``theta`` at every free position (the free mask is spent: it may be cleared)."""
    if free is None or not fused_copy_where(free, result, theta):
        _copy_where(task, result, theta, free)


def _bool_scratch(task: TensorTask) -> Callable[[str], Tensor]:
    return lambda role: task.scratch(role, torch.bool)


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _copy_where(task: TensorTask, result: Tensor, theta: Tensor, mask: Tensor | None) -> None:
    """result[mask] = θ_k in place (everywhere when ``mask`` is None), bit for bit.

    Blended on the bits, r ^= (r ^ θ)·mask, which is three simple passes and several times
    faster than ``torch.where`` or boolean indexing on the CPU for 16-bit floats.
    """
    if mask is None:
        result.copy_(theta)
        return
    ints = _SAME_SIZE_INT.get(result.element_size())
    if ints is None or result.is_complex():
        torch.where(mask, theta, result, out=result)
        return
    bits = result.view(ints)
    flips = torch.bitwise_xor(bits, theta.view(ints), out=task.scratch("flips", ints))
    flips.mul_(mask.view(torch.uint8))
    bits.bitwise_xor_(flips)
