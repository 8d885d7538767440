"""Which entries of a task vector survive: the sparsification steps of TIES, DARE, DELLA and Breadcrumbs.

Every function returns a boolean keep-mask (or, for DELLA, the keep probability that a mask is
drawn from) so that methods compose masks with sign consensus and rescaling instead of copying
each other. Exact counts use :func:`~obim_trainer.merging.topk.select_top` (a radix select,
no sort); random masks come from the task's seeded generator, identical on CPU and GPU.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from obim_trainer.merging.task import TensorTask
from obim_trainer.merging.topk import select_top

RescaleMode = Literal["inverse", "l1"]
"""``inverse``: divide kept entries by their keep probability (the DARE and DELLA papers);
``l1``: scale the kept entries to the L1 norm of the whole task vector (mergekit)."""

L1_EPS = 1e-7
"""mergekit leaves a task vector unscaled when its L1 norm before or after dropping is below this."""

_ROUND_OFF = 1e-12
_RANK_CHUNK = 1 << 22
"""DELLA ranks rows in blocks of about this many entries, bounding the int64 temporaries of a sort."""


def share_count(numel: int, share: float) -> int:
    """⌊share·numel⌋, guarded against decimal round-off (0.29·100 is 29 entries, not 28)."""
    return min(numel, int(share * numel * (1 + _ROUND_OFF)))


def keep_count(numel: int, density: float) -> int:
    """Entries TIES keeps at ``density``: ``max(1, ⌊density·numel⌋)`` for 0 < density < 1 (mergekit's rule)."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, share_count(numel, density))


def magnitude_mask(scores: Tensor, density: float) -> Tensor:
    """Keep the ``density`` share with the largest ``scores`` (|δ| for TIES' trimming; ties to the lowest index)."""
    return select_top(scores, keep_count(scores.numel(), density))


def outlier_mask(magnitude: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs: drop the ``gamma`` share of largest magnitudes and the smallest ones, keeping ``density``.

    Outlier removal shrinks when needed so that the target density is still reached, and a
    density of 1 keeps everything (mergekit's rules).
    """
    numel = magnitude.numel()
    if density >= 1:
        return torch.ones_like(magnitude, dtype=torch.bool)
    target = share_count(numel, density)
    top = min(share_count(numel, gamma), numel - target)
    return select_top(magnitude, top + target) & ~select_top(magnitude, top)


def random_keep_mask(task: TensorTask, k: int, probability: Tensor | float) -> Tensor:
    """Keep each entry of checkpoint ``k``'s task vector with ``probability`` (a number or one per entry).

    The draw is seeded by the task (its seed, tensor name and ``k``), so a merge is reproducible
    and the same on every device.
    """
    return task.rand_like_base("drop", k) < probability


def della_keep_probability(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune: keep probability rising linearly with the magnitude rank inside each row.

    The smallest entry of a row is kept with probability density − ε and the largest with
    density + ε (mergekit's parameterisation of the paper's p_i = p_min + (ε/n)·r_i). Rows are
    the first dimension (output features); a 1-D tensor is one row. One sort per block of rows.
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    probability = torch.empty(rows.shape, dtype=torch.float32, device=delta.device)
    if width == 1:
        return probability.fill_(density).view(delta.shape)
    step_per_rank = 2 * epsilon / (width - 1)
    positions = torch.arange(width, device=delta.device)
    block = max(1, _RANK_CHUNK // width)
    for start in range(0, rows.shape[0], block):
        order = rows[start : start + block].abs().argsort(dim=1)
        ranks = torch.empty_like(order).scatter_(1, order, positions.expand_as(order))
        probability[start : start + block] = ranks.to(torch.float32).mul_(step_per_rank).add_(density - epsilon)
    return probability.view(delta.shape)


def rescale(kept: Tensor, delta: Tensor, mode: RescaleMode, probability: Tensor | float) -> Tensor:
    """Undo the shrinkage of dropping entries, in place on ``kept`` (``delta`` with dropped entries zeroed).

    ``inverse`` divides by the keep probability, which makes the kept task vector unbiased
    (E[kept] = δ entry by entry; DARE's 1/(1 − p), DELLA's 1/(1 − p_i)). ``l1`` scales the
    tensor so that its L1 norm equals that of ``delta`` (mergekit's ``rescale``).
    """
    if mode == "inverse":
        return kept.div_(probability) if isinstance(probability, Tensor) else kept.mul_(1.0 / probability)
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return kept
    return kept.mul_(before / after)


def apply_mask(
    delta: Tensor, keep: Tensor, mode: RescaleMode | None = None, probability: Tensor | float = 1.0
) -> Tensor:
    """``delta`` with the dropped entries zeroed (in place when not rescaled), then :func:`rescale`d by ``mode``."""
    if mode is None:
        return delta.mul_(keep)
    return rescale(delta * keep, delta, mode, probability)
