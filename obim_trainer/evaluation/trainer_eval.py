"""Evaluate a merged folder exactly as the Trainer evaluates its checkpoints, inside the running Trainer.

Checkpoints are judged by ``Trainer.evaluate`` on its ``eval_dataset`` (``eval_<name>_loss`` for a
dict of datasets). For the merges to be comparable with them — same batches, same collator, same
loss, distributed the same way, ZeRO-3 included — the merged weights are loaded into the live
model, the Trainer's own evaluation loop runs on each dataset, and the trained weights are put
back bit for bit (every rank's local share is kept aside meanwhile). Nothing of the Trainer's
record changes: the loop is called without ``Trainer.log`` or ``on_evaluate``, and the random
number generators are restored, so training goes on as if no merge had been evaluated.
"""

from __future__ import annotations

import inspect
import logging
import random
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from obim_trainer.distributed import ZeroGatherer, is_partitioned

logger = logging.getLogger(__name__)


def find_trainer(callback: object) -> weakref.ref | None:
    """A weak reference to the ``Trainer`` that is calling ``callback`` now (found up the call stack).

    Trainer callbacks receive the model, not the Trainer; the Trainer is the ``self`` of a calling
    frame whose callback handler holds ``callback``. Weak, so the callback does not keep the Trainer
    (and its model) alive after the caller drops it.
    """
    from transformers import Trainer

    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and callback in owner.callback_handler.callbacks:
            return weakref.ref(owner)
        frame = frame.f_back
    return None


def eval_datasets(trainer: Any) -> dict[str | None, Any]:
    """The Trainer's evaluation datasets by name (``None`` for a single dataset); empty without any."""
    datasets = trainer.eval_dataset
    if datasets is None or trainer.args.eval_strategy == "no":
        return {}
    return dict(datasets) if isinstance(datasets, dict) else {None: datasets}


def _local_tensors(model: nn.Module) -> list[Tensor]:
    """Every tensor this rank holds of a ZeRO-3 model's state: its partitions and any whole data
    (buffers, parameters DeepSpeed keeps whole)."""
    tensors = []
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data.numel() > 0:
            tensors.append(tensor.data)
        partition = getattr(tensor, "ds_tensor", None)
        if partition is not None:
            tensors.append(partition.data)
    return tensors


def _release_gathered(trainer: Any) -> None:
    """Partition again every ZeRO-3 parameter a forward pass left gathered (DeepSpeed keeps them for reuse):
    its whole copy would otherwise outlive a change of the partitions, and the next pass would use it."""
    release = getattr(trainer.model_wrapped, "empty_partition_cache", None)
    if callable(release):
        release()


@contextmanager
def _partitions_kept(model: nn.Module) -> Iterator[None]:
    """ZeRO-3: each rank keeps its own partitions (1/N of the model) and puts them back."""
    tensors = _local_tensors(model)
    saved = [t.detach().to("cpu", copy=True) for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, copy in zip(tensors, saved, strict=True):
                tensor.copy_(copy.to(tensor.device))


@contextmanager
def _replicas_kept(model: nn.Module) -> Iterator[None]:
    """Whole weights on every rank (one process, DDP, ZeRO-1/2): rank 0 alone keeps a copy, and puts it
    back on every rank as :meth:`ZeroGatherer.load_checkpoint` loads (rank 0 writes, the others receive)."""
    gatherer = ZeroGatherer(model)
    saved: dict[str, Tensor] = {}
    gatherer.visit(
        lambda entry, tensor: saved.__setitem__(entry.name, tensor.detach().to("cpu", copy=True)),
        modify=False,
        what="keeping the trained weights aside",
    )
    try:
        yield
    finally:
        with torch.no_grad():
            gatherer.visit(
                lambda entry, tensor: tensor.data.copy_(saved[entry.name].to(tensor.device)),
                modify=True,
                what="putting the trained weights back",
            )


@contextmanager
def weights_kept(trainer: Any) -> Iterator[None]:
    """Inside, the Trainer's live model may be overwritten (by a merge's weights); on leaving, the trained
    weights are back exactly, on every rank. Host memory meanwhile: each rank's partitions under ZeRO-3,
    else one copy of the model on rank 0."""
    _release_gathered(trainer)
    model = trainer.model
    with _partitions_kept(model) if is_partitioned(model) else _replicas_kept(model):
        try:
            yield
        finally:
            _release_gathered(trainer)


@contextmanager
def rng_kept() -> Iterator[None]:
    """Inside, random numbers may be drawn (a data loader's seed); on leaving, every generator is as before."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def evaluate_like_checkpoints(trainer: Any, folder: Path) -> dict[str, float]:
    """The Trainer's evaluation metrics of the model in ``folder`` (collective: every rank calls it).

    Same names as the checkpoints' (``eval_<name>_loss``, ``eval_loss``), computed by
    ``Trainer.evaluation_loop`` on the Trainer's own eval dataloaders; speed metrics are left out.
    """
    datasets = eval_datasets(trainer)
    metrics: dict[str, float] = {}
    model = trainer.model
    was_training = model.training
    logger.info("evaluating %s in the live model with the Trainer; the trained weights are put back after", folder)
    with rng_kept(), weights_kept(trainer):
        ZeroGatherer(model).load_checkpoint(folder)
        for name, dataset in datasets.items():
            prefix = "eval" if name is None else f"eval_{name}"
            loader = trainer.get_eval_dataloader(name if name is not None else dataset)
            output = trainer.evaluation_loop(
                loader,
                description=f"Evaluation of {folder.name}",
                # as Trainer.evaluate: no predictions gathered unless metrics need them
                prediction_loss_only=True if trainer.compute_metrics is None else None,
                metric_key_prefix=prefix,
            )
            metrics.update({k: float(v) for k, v in output.metrics.items() if isinstance(v, (int, float))})
    model.train(was_training)
    return metrics
