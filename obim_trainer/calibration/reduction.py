"""Sums of statistics across the ranks of a process group, shared by every kind of statistics
(through :func:`~obim_trainer.distributed.ranks.all_reduce`, the project's one all-reduce).

Every rank records its share of the calibration texts; the statistics of the whole set are the
sums. Collectives run over keys in sorted order, so every rank enters the same collectives in the
same order (every rank must hold the same keys). Small tensors travel together in one flat buffer
(few collectives); a tensor larger than the bucket travels alone, so the extra memory is bounded
by the bucket or by the largest tensor (an 11008² Gram), never by the sum of all of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from obim_trainer.distributed.ranks import all_reduce, is_distributed

BUCKET_NUMEL = 1 << 24
"""Elements sent together in one collective (64 MiB of float32)."""


def _buckets(names: list[str], tensors: dict[str, Tensor], bucket_numel: int) -> list[list[str]]:
    buckets: list[list[str]] = []
    size = bucket_numel
    for name in names:
        numel = tensors[name].numel()
        if size + numel > bucket_numel:
            buckets.append([])
            size = 0
        buckets[-1].append(name)
        size += numel
    return buckets


def all_reduce_sums(
    tensors: dict[str, Tensor], group: Any = None, *, bucket_numel: int = BUCKET_NUMEL
) -> dict[str, Tensor]:
    """The element-wise sums of ``tensors`` over all ranks, on the CPU in each tensor's dtype.

    Tensors of one bucket must share a dtype (each kind of statistics keeps one dtype).
    Returns ``tensors`` itself outside a process group.
    """
    if not is_distributed():
        return tensors
    reduced: dict[str, Tensor] = {}
    for bucket in _buckets(sorted(tensors), tensors, bucket_numel):
        flat = all_reduce(torch.cat([tensors[n].reshape(-1).cpu() for n in bucket]), group=group)
        parts = flat.split([tensors[n].numel() for n in bucket])
        reduced.update({n: p.view(tensors[n].shape).clone() for n, p in zip(bucket, parts, strict=True)})
    return reduced


def all_reduce_counts(counts: dict[str, int], group: Any = None) -> dict[str, int]:
    """Integer counts summed over all ranks (``counts`` itself outside a process group).

    float64 holds integer counts exactly up to 2**53 and every backend reduces it.
    """
    if not is_distributed() or not counts:
        return counts
    names = sorted(counts)
    values = all_reduce(torch.tensor([counts[n] for n in names], dtype=torch.float64), group=group)
    return {n: int(c) for n, c in zip(names, values.tolist(), strict=True)}
