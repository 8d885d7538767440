"""The calibration loop every kind of statistics shares: padded batches on the model's device, a
progress bar, and the model in eval mode (no dropout) for the duration, its mode restored after.

:func:`record_forward_passes` is the one loop that feeds a recorder's hooks, in one process (a merge)
and across the ranks of a training run (the callback's statistics of the live model): there each rank
runs its share in step with the others (:mod:`~obim_trainer.distributed.lockstep`) and the caller
all-reduces the sums."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from obim_trainer.calibration.data import CalibrationSet
from obim_trainer.distributed.lockstep import local_share, lockstep_batches


def model_label(model: nn.Module) -> str:
    """How progress bars and logs name a model: ``config.name_or_path``, else its class."""
    return getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__


def input_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device``, or the device of the model's first parameter."""
    return torch.device(device) if device is not None else next(model.parameters()).device


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside, its train/eval mode as before afterwards (also on errors)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def device_batches(
    calibration: CalibrationSet,
    batch_size: int,
    device: torch.device,
    *,
    progress: bool = True,
    desc: str = "calibration",
) -> Iterator[tuple[Tensor, Tensor]]:
    """Right-padded ``(input_ids, attention_mask)`` batches on ``device``, behind a progress bar."""
    n_batches = -(-len(calibration.input_ids) // max(batch_size, 1))  # batches() rejects batch_size < 1
    for ids, mask in tqdm(
        calibration.batches(batch_size), total=n_batches, desc=desc, unit="batch", disable=not progress
    ):
        yield ids.to(device), mask.to(device)


class Recorder(Protocol):
    """Forward hooks that accumulate statistics (:class:`~obim_trainer.calibration.ActivationRecorder`,
    :class:`~obim_trainer.calibration.GramRecorder`)."""

    def set_token_mask(self, attention_mask: Tensor | None) -> None: ...

    def attached(self) -> AbstractContextManager[Any]: ...


def _rank_batches(calibration: CalibrationSet, batch_size: int) -> Iterator[tuple[Tensor, Tensor, bool]]:
    """``(input_ids, attention_mask, real)`` of this rank's share, in step with the other ranks."""
    for batch in lockstep_batches(calibration, batch_size):
        yield batch.input_ids, batch.attention_mask, batch.real


def record_forward_passes(
    model: nn.Module,
    recorder: Recorder,
    calibration: CalibrationSet,
    *,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    desc: str = "calibration",
    across_ranks: bool = False,
) -> CalibrationSet:
    """Run ``model`` forward (no labels, no gradients, eval mode) on the calibration batches with
    ``recorder`` attached; returns the samples this process ran.

    With ``across_ranks`` every rank of the process group must call this: each runs its share of the
    samples, in step with the others, and the caller all-reduces what was recorded. A filler batch
    (a rank that ran out of samples) runs with its real mask but is recorded with a zero one, so it
    counts no token.
    """
    if across_ranks:
        share = local_share(calibration)
        batches = tqdm(_rank_batches(calibration, batch_size), desc=desc, unit="batch", disable=not progress)
    else:
        share = calibration
        batches = (
            (ids, mask, True)
            for ids, mask in device_batches(calibration, batch_size, device, progress=progress, desc=desc)
        )
    # no_grad, not inference_mode: ZeRO-3's parameter-gathering hooks break on inference tensors
    with evaluation_mode(model), recorder.attached(), torch.no_grad():
        for ids, mask, real in batches:
            ids, mask = ids.to(device), mask.to(device)
            recorder.set_token_mask(mask if real else torch.zeros_like(mask))
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    return share
