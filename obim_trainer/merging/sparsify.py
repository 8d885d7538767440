"""Which entries of a task vector to keep: the sparsification steps of TIES, DARE, DELLA and Breadcrumbs.

Every function returns a boolean keep-mask (and, for random ones, the keep probability) so that
methods compose masks with sign consensus and rescaling instead of copying each other. Exact
counts use :func:`~obim_trainer.merging.selection.select_top`, not a sort.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from obim_trainer.merging.selection import select_top

RescaleMode = Literal["l1", "inverse"]
L1_EPS = 1e-7


def keep_count(numel: int, density: float) -> int:
    """Entries kept at ``density``: ``max(1, ⌊density·numel⌋)`` for 0 < density < 1 (mergekit's rule)."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def magnitude_mask(scores: Tensor, density: float) -> Tensor:
    """Keep the ``density`` share with the largest ``scores`` (|δ| for TIES' trimming)."""
    return select_top(scores, keep_count(scores.numel(), density))


def outlier_mask(magnitude: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs: drop the ``gamma`` share of largest magnitudes, then the smallest, keeping ``density``.

    Outlier removal shrinks when needed so that the target density is still reached (mergekit's rule).
    """
    numel = magnitude.numel()
    if density >= 1:
        return torch.ones_like(magnitude, dtype=torch.bool)
    target = int(density * numel)
    top = min(int(gamma * numel), numel - target)
    return select_top(magnitude, top + target) & ~select_top(magnitude, top)


def bernoulli_mask(probability: Tensor | float, like: Tensor, generator: torch.Generator) -> Tensor:
    """Keep each entry with ``probability`` (DARE: the density; DELLA: per entry), seeded on the CPU."""
    draw = torch.rand(like.shape, generator=generator, dtype=torch.float32).to(like.device)
    return draw < probability


def della_keep_probability(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune: keep probability rises linearly with the magnitude rank inside each row,
    from density − ε (smallest) to density + ε (largest)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
    span = (rows.shape[1] - 1) or 1
    return ((density - epsilon) + ranks / span * 2 * epsilon).reshape(delta.shape)


def rescale(kept: Tensor, delta: Tensor, mode: RescaleMode, probability: Tensor | float) -> Tensor:
    """Undo the shrinkage of dropping entries.

    ``inverse`` divides by the keep probability (the DARE and DELLA papers: unbiased in
    expectation); ``l1`` matches the L1 norm of the full task vector (mergekit's rule).
    """
    if mode == "inverse":
        return kept.div_(probability) if isinstance(probability, Tensor) else kept.mul_(1.0 / probability)
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return kept
    return kept.mul_(before / after)
