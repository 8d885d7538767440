"""Seeded uniform scores for "random pruning": a hash of the position, not a random number stream.

The paper scores parameters without a Hessian estimate (norms, biases, embeddings) at random.
Drawing those numbers from a generator is serial work (about 5 ns per position on a CPU) and has
to happen on the CPU to give the same numbers everywhere. A hash of (seed, flat position) is the
same on every device by construction, costs a few integer operations, and the fused loops of
:mod:`~obim_trainer.merging.fused_take` compute it in place, so the scores are never stored.
``native/fused_take.cpp`` (``random_score``) computes exactly what :func:`uniform_at` computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # below 2^27: products of 32-bit values stay inside int64
_CHUNK = 1 << 22  # positions hashed at a time when materializing (bounds the int64 temporaries)


def _mix32(v: Tensor) -> Tensor:
    v = v ^ (v >> 16)
    v = (v * _MULTIPLIER) & _M32
    v = v ^ (v >> 16)
    v = (v * _MULTIPLIER) & _M32
    return v ^ (v >> 16)


def uniform_at(seed: int, positions: Tensor) -> Tensor:
    """Uniform [0, 1) float32 scores (24 random bits) of int64 flat ``positions`` under ``seed``."""
    lo, hi = seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF
    hashed = _mix32((positions & _M32) ^ lo ^ _mix32((positions >> 32) ^ hi))
    return (hashed >> 8).to(torch.float32).mul_(2.0**-24)


@dataclass(frozen=True)
class RandomScores:
    """Uniform scores of every position of a tensor under ``seed``, described rather than computed."""

    seed: int
    shape: torch.Size
    device: torch.device

    def materialize(self, out: Tensor | None = None) -> Tensor:
        """The scores as a float32 tensor (into ``out`` when given), hashed chunk by chunk."""
        scores = torch.empty(self.shape, dtype=torch.float32, device=self.device) if out is None else out
        flat, numel = scores.view(-1), scores.numel()
        for start in range(0, numel, _CHUNK):
            positions = torch.arange(start, min(numel, start + _CHUNK), dtype=torch.int64, device=self.device)
            flat[start : start + positions.numel()] = uniform_at(self.seed, positions)
        return scores
