"""Sums of statistics across the ranks of a process group, shared by every kind of statistics.

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

BUCKET_NUMEL = 1 << 24
"""Elements sent together in one collective (64 MiB of float32)."""


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group is running (reductions are no-ops otherwise)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def collective_device(group: Any) -> torch.device:
    """Gloo reduces CPU tensors; NCCL (and other accelerator backends) need them on the current device."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


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
    if not distributed():
        return tensors
    import torch.distributed as dist

    device = collective_device(group)
    reduced: dict[str, Tensor] = {}
    for bucket in _buckets(sorted(tensors), tensors, bucket_numel):
        flat = torch.cat([tensors[n].reshape(-1).cpu() for n in bucket]).to(device)
        dist.all_reduce(flat, group=group)
        parts = flat.cpu().split([tensors[n].numel() for n in bucket])
        reduced.update({n: p.view(tensors[n].shape).clone() for n, p in zip(bucket, parts, strict=True)})
    return reduced


def all_reduce_counts(counts: dict[str, int], group: Any = None) -> dict[str, int]:
    """Integer counts summed over all ranks (``counts`` itself outside a process group).

    float64 holds integer counts exactly up to 2**53 and every backend reduces it.
    """
    if not distributed() or not counts:
        return counts
    import torch.distributed as dist

    names = sorted(counts)
    values = torch.tensor([counts[n] for n in names], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(values, group=group)
    return {n: int(c) for n, c in zip(names, values.tolist(), strict=True)}
