"""Iterative merging (IM): mutually exclusive selection of each checkpoint's most salient positions.

Algorithm 1 of the paper: the merged mask M starts empty; for k in order, the positions
already in M are removed from k's candidates, k takes its top n_k share of the tensor, and
those positions join M. The merged tensor is θ_M = θ_B + Σ_k δ_k·mask_k (eq. 8): no position
is ever averaged, so no checkpoint's change is diluted by another's.
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
    """Merge one tensor by Algorithm 1.

    Args:
        task: The tensor and lazy access to the checkpoints.
        ratios: Share n_k of the whole tensor for each checkpoint k (indexed by k).
        order: Checkpoint indices in merge order for this tensor.
        saliency: Scores of checkpoint k's positions (see :mod:`obim_trainer.merging.saliency`).

    Each checkpoint is loaded once; at owned positions its own value θ_k is written, which
    equals θ_B + δ_k without the rounding of the sum. Memory: the result, the taken mask and
    one checkpoint with its scores at a time.
    """
    numel = task.base.numel()
    counts = apportion(numel, [ratios[k] for k in order])
    result = task.base.clone()
    taken = torch.zeros(task.base.shape, dtype=torch.bool, device=task.device)
    free = numel
    owned = [0] * task.num_models
    for k, count in zip(order, counts, strict=True):
        if count == 0:
            continue
        theta = task.checkpoint(k)
        if count == free:  # the rest is this checkpoint's: no scores needed
            mask = ~taken
        else:
            scores = saliency(task, k, theta - task.base)
            mask = select_top(scores, count, exclude=taken, num_available=free)
            del scores
        torch.where(mask, theta, result, out=result)
        taken |= mask
        free -= count
        owned[k] = count
    return MergeOutput(tensor=result, owned=owned)
