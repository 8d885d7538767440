"""The calibration loop every kind of statistics shares: padded batches on the model's device, a
progress bar, and the model in eval mode (no dropout) for the duration, its mode restored after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from obim_trainer.calibration.data import CalibrationSet


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
