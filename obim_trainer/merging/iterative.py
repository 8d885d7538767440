"""Iterative merging (IM): mutually exclusive selection of each checkpoint's most salient positions.

Algorithm 1 of the paper: the merged mask M starts empty; for k in the order O, the positions
already in M are removed from k's candidates, k takes the top n_k share of the tensor by its
saliency, and those positions join M. The merged tensor is θ_M = θ_B + Σ_k δ_k·mask_k (eq. 8).
The masks are disjoint, so no position is ever averaged and no checkpoint's change is diluted
by another's; positions outside M keep the base (Σ n_k ≤ 1, the footnote to eq. 8).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from obim_trainer.merging.saliency import SaliencyFn
from obim_trainer.merging.selection import apportion, select_top
from obim_trainer.merging.task import MergeOutput, TensorTask


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
        is :func:`~obim_trainer.merging.selection.apportion` of the ratios in this order.

    Each checkpoint is loaded once, and only one at a time, in its stored dtype. At owned
    positions θ_k itself is copied, which equals θ_B + δ_k without the rounding of that sum,
    so the result stays in the inputs' (promoted) dtype and starts as the stored base: no
    arithmetic touches it. δ_k (computed only if the saliency reads it) and its scores are
    float32, in one scratch buffer; the taken mask and the selection's masks are bool scratch
    buffers: memory is the result, one checkpoint, one float32 tensor for the scores and three
    bool masks, whatever K is. A checkpoint whose count equals the positions still free takes
    all of them without being scored.
    """
    if len(set(order)) != len(order) or not set(order) <= set(range(task.num_models)):
        raise ValueError(f"merge order {list(order)} must list distinct checkpoint indices < {task.num_models}")
    numel = task.base.numel()
    counts = apportion(numel, [ratios[k] for k in order])
    result = task.base_stored if task.base_stored is not None else task.base.clone()
    free: Tensor | None = None  # None: every position is free
    num_free = numel
    owned = [0] * task.num_models
    for k, count in zip(order, counts, strict=True):
        if count == 0:
            continue
        theta = task.checkpoint_stored(k)
        if theta.dtype != result.dtype:
            result = result.to(torch.promote_types(result.dtype, theta.dtype))
            theta = theta.to(result.dtype)
        if count == num_free:
            _copy_where(task, result, theta, free)
        else:
            scores = saliency(task, k, partial(_delta, task, theta))
            mask = select_top(scores, count, free, num_available=num_free, scratch=_bool_scratch(task))
            del scores
            _copy_where(task, result, theta, mask)
            if free is None:
                free = torch.logical_not(mask, out=task.scratch("free", torch.bool))
            else:
                free ^= mask  # mask ⊆ free
        del theta
        num_free -= count
        owned[k] = count
    return MergeOutput(tensor=result, owned=owned)


def _bool_scratch(task: TensorTask) -> Callable[[str], Tensor]:
    return lambda role: task.scratch(role, torch.bool)


def _delta(task: TensorTask, theta: Tensor) -> Tensor:
    """δ_k = θ_k − θ_B in float32, in the scratch buffer for scores (the saliency turns it into scores in place).

    Converting first and subtracting in float32 is twice as fast as torch's mixed-dtype subtraction.
    """
    return task.scratch("scores").copy_(theta).sub_(task.base)


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
