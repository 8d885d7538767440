"""TIES' sign election and disjoint mean, shared by every method with a sign consensus step
(TIES, DARE-TIES, DELLA, Breadcrumbs-TIES and the ``ties_obm`` ablation).

The vote is on the weighted task vectors, as in mergekit: a checkpoint's weight is also its
say in the vote. Where the weighted deltas sum to exactly zero the TIES paper's sgn(0) = 0
elects no sign, so nothing agrees and the entry keeps the base (``sign_tie: zero``, the default);
mergekit elects + there (``sign_tie: positive``). Exact cancellation is rare in float32 but
common enough in bfloat16 checkpoints, where deltas take few distinct values.

On the CPU the disjoint merge is one pass of the native library over the K deltas (the same float32
additions in the same order, so the same bits) instead of a dozen torch passes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from obim_trainer.merging.native_library import native_library

SignTie = Literal["zero", "positive"]


def elect_sign(weighted_deltas: Tensor, tie: SignTie = "zero") -> Tensor:
    """Sign of Σ_k w_k·δ_k per entry (TIES' "elect"); where the sum is 0: 0 or +1 by ``tie``.

    ``weighted_deltas`` is stacked ``[K, ...]``; the result has the shape of one delta.
    """
    total = weighted_deltas.sum(dim=0)
    if tie == "positive":
        return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    return total.sign_()


def disjoint_merge(
    weighted_deltas: Tensor, weights: Sequence[float], sign: Tensor, *, normalize: bool = True
) -> Tensor:
    """Σ_k w_k·δ_k over the entries whose sign agrees with ``sign``; zero deltas never agree.

    With ``normalize`` this is TIES' disjoint mean: divided, entry by entry, by Σ_k w_k over the
    agreeing checkpoints (by their count for unit weights); an entry nobody agrees on stays 0.
    One checkpoint at a time, in two buffers the size of one delta reused for every checkpoint.
    """
    fused = _fused_disjoint_merge(weighted_deltas, weights, sign, normalize)
    if fused is not None:
        return fused
    merged = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign) if normalize else None
    elected = sign != 0
    agree = torch.empty(sign.shape, dtype=torch.bool, device=sign.device)
    picked = torch.empty_like(sign)  # reused: fresh memory for every pass costs more than the pass
    zero = torch.zeros((), dtype=sign.dtype, device=sign.device)
    for k, weight in enumerate(weights):
        torch.eq(torch.sign(weighted_deltas[k], out=picked), sign, out=agree).logical_and_(elected)
        merged.add_(torch.where(agree, weighted_deltas[k], zero, out=picked))
        if divisor is not None:
            divisor.add_(picked.copy_(agree), alpha=weight)
    if divisor is None:
        return merged
    return merged.div_(divisor.masked_fill_(divisor == 0, 1.0))


def _fused_disjoint_merge(
    weighted_deltas: Tensor, weights: Sequence[float], sign: Tensor, normalize: bool
) -> Tensor | None:
    """:func:`disjoint_merge` in one native pass over the deltas (the same bits), or ``None`` where it does
    not apply (no compiled library, not float32 CPU tensors in one block)."""
    library = native_library()
    tensors = (weighted_deltas, sign)
    if library is None or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    if not all(t.is_contiguous() for t in tensors) or weighted_deltas.shape[1:] != sign.shape:
        return None
    out = torch.empty_like(sign)
    library.obim_disjoint_merge(
        weighted_deltas.data_ptr(), len(weights), (ctypes.c_float * len(weights))(*weights), sign.data_ptr(),
        int(normalize), out.data_ptr(), sign.numel(), torch.get_num_threads(),
    )  # fmt: skip
    return out
