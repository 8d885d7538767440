"""Activation statistics of the model being trained, computed by all ranks together.

At a save, the live model *is* the checkpoint just written, so its statistics can be recorded
without loading the checkpoint again: each rank runs its share of the calibration samples
(forward only, in step with the others, see :mod:`~obim_trainer.distributed.lockstep`) and
the sums are all-reduced. The result equals what ``ActivationStats.collect`` computes on the
checkpoint in one process, up to the order of float32 additions.
"""

from __future__ import annotations

import torch
from torch import nn

from obim_trainer.calibration import ActivationRecorder, ActivationStats, CalibrationSet
from obim_trainer.distributed.lockstep import local_share, lockstep_batches


def collect_live_stats(
    model: nn.Module, calibration: CalibrationSet, *, batch_size: int, device: torch.device
) -> ActivationStats:
    """Σx² per input feature of every Linear/Conv1D over all ranks' samples (collective)."""
    was_training = model.training
    model.eval()
    recorder = ActivationRecorder(model)
    try:
        # no_grad, not inference_mode: ZeRO-3's parameter-gathering hooks break on inference tensors
        with recorder.attached(), torch.no_grad():
            for batch in lockstep_batches(calibration, batch_size):
                mask = batch.attention_mask.to(device)
                recorder.set_token_mask(mask if batch.real else torch.zeros_like(mask))
                model(input_ids=batch.input_ids.to(device), attention_mask=mask, use_cache=False)
    finally:
        model.train(was_training)
    stats = recorder.stats()
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab:
        stats.token_counts = local_share(calibration).token_counts(vocab)
    stats.all_reduce()
    return stats
