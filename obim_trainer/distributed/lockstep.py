"""Forward passes split over ranks that stay in step.

Under ZeRO-3 every forward pass gathers each layer's parameters with collectives, so all
ranks must run the same number of forward passes or the ranks with more work wait forever.
Each rank takes every ``world_size``-th sample; a rank that runs out first runs one-token
filler batches, marked as not real so that their results are ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from obim_trainer.distributed.ranks import is_distributed, max_over_ranks, rank, world_size

if TYPE_CHECKING:  # calibration runs its forward passes through this module
    from obim_trainer.calibration.data import CalibrationSet


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids and attention mask; ``real`` is False for filler batches."""

    input_ids: Tensor
    attention_mask: Tensor
    real: bool = True


def local_share(samples: CalibrationSet) -> CalibrationSet:
    """This rank's samples (all of them outside a process group)."""
    return samples.shard(rank(), world_size()) if is_distributed() else samples


def lockstep_batches(samples: CalibrationSet, batch_size: int) -> Iterator[Batch]:
    """This rank's batches, padded with filler batches to the largest batch count of any rank.

    Collective (one all-reduce): every rank must call it, and iterate it to the end.
    """
    share = local_share(samples)
    own = -(-len(share.input_ids) // batch_size)
    total = max_over_ranks(own)
    for ids, mask in share.batches(batch_size):
        yield Batch(ids, mask)
    filler = torch.full((1, 1), samples.pad_token_id, dtype=torch.long)
    for _ in range(total - own):
        yield Batch(filler, torch.ones_like(filler), real=False)
