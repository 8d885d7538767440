"""Iterative merging (IM): mutually exclusive selection of each checkpoint's most salient positions.

Algorithm 1 of the paper: the merged mask M starts empty; for k in the order O, the positions
already in M are removed from k's candidates, k takes the top n_k share of the tensor by its
saliency, and those positions join M. The merged tensor is θ_M = θ_B + Σ_k δ_k·mask_k (eq. 8).
The masks are disjoint, so no position is ever averaged and no checkpoint's change is diluted
by another's; positions outside M keep the base (Σ n_k ≤ 1, the footnote to eq. 8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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

    Each checkpoint is loaded once, and only one at a time: memory is the result, the free-position
    mask, one checkpoint, its scores and the selection's temporaries. At owned positions θ_k itself
    is written, which equals θ_B + δ_k without the rounding of that sum. A checkpoint whose count
    equals the positions still free takes all of them without being scored.
    """
    if len(set(order)) != len(order) or not set(order) <= set(range(task.num_models)):
        raise ValueError(f"merge order {list(order)} must list distinct checkpoint indices < {task.num_models}")
    counts = apportion(task.base.numel(), [ratios[k] for k in order])
    result = task.base.clone()
    free = torch.ones(task.base.shape, dtype=torch.bool, device=task.device)
    num_free = task.base.numel()
    owned = [0] * task.num_models
    for k, count in zip(order, counts, strict=True):
        if count == 0:
            continue
        theta = task.checkpoint(k)
        if count == num_free:
            mask = free
        else:
            scores = saliency(task, k, theta - task.base)
            mask = select_top(scores, count, free, num_available=num_free)
            del scores
        torch.where(mask, theta, result, out=result)
        del theta
        free ^= mask  # mask ⊆ free
        num_free -= count
        owned[k] = count
    return MergeOutput(tensor=result, owned=owned)
