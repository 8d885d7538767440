"""Whole weights of a (possibly ZeRO-3 partitioned) model, one module at a time.

Under ZeRO-3 each rank holds a slice of every parameter. Writing a consolidated checkpoint
(when ``stage3_gather_16bit_weights_on_model_save`` is off, DeepSpeed only saves its own
shards) or loading merged weights back into the live model needs whole parameters, but
gathering the whole model on one rank costs the model's full size there. :class:`ZeroGatherer`
gathers one module's own parameters at a time with ``deepspeed.zero.GatheredParameters``;
every rank enters every gather in the same order, rank 0 reads or writes, and failures on
rank 0 are shared with every rank. Without ZeRO-3 the gathers are no-ops and the same code
serves plain and data-parallel models (rank 0's values are then broadcast on load).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from obim_trainer.checkpoints import CheckpointReader, ShardedSafetensorsWriter, open_checkpoint
from obim_trainer.checkpoints.atomic import rename_durably
from obim_trainer.distributed.ranks import is_distributed, is_main_process, run_on_main, share_failure
from obim_trainer.errors import CheckpointError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StateEntry:
    """One tensor of the model's state dict: its saved name and where it lives on the module."""

    name: str
    module: nn.Module
    attr: str
    is_buffer: bool

    def tensor(self) -> Tensor:
        return getattr(self.module, self.attr)


def is_partitioned(model: nn.Module) -> bool:
    """True when ZeRO-3 has partitioned the model's parameters (DeepSpeed tags them with ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _full_shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def _state_groups(model: nn.Module) -> list[list[StateEntry]]:
    """Per module, in module order, its own parameters and persistent buffers.

    A tensor shared by two modules (tied embeddings) appears once, under its first name, as in
    ``save_pretrained`` output.
    """
    seen: set[int] = set()
    groups = []
    for prefix, module in model.named_modules():
        entries = []
        named: list[tuple[str, Tensor | None, bool]] = [
            *((a, p, False) for a, p in module.named_parameters(recurse=False)),
            *(
                (a, b, True)
                for a, b in module.named_buffers(recurse=False)
                if a not in module._non_persistent_buffers_set
            ),
        ]
        for attr, tensor, is_buffer in named:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            entries.append(StateEntry(f"{prefix}.{attr}" if prefix else attr, module, attr, is_buffer))
        if entries:
            groups.append(entries)
    return groups


class ZeroGatherer:
    """Visit a model's state one module at a time with whole tensors on rank 0."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.partitioned = is_partitioned(model)
        self.groups = _state_groups(model)

    def plan(self) -> list[tuple[str, tuple[int, ...], Any]]:
        """``(name, full shape, dtype)`` of every state tensor, in visiting order."""
        return [(e.name, _full_shape(e.tensor()), e.tensor().dtype) for group in self.groups for e in group]

    def _gathered(self, group: list[StateEntry], modifier_rank: int | None) -> Any:
        params = [e.tensor() for e in group if not e.is_buffer]
        if not (self.partitioned and params):
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    def visit(self, fn: Callable[[StateEntry, Tensor], None], *, modify: bool, what: str) -> None:
        """Call ``fn(entry, whole tensor)`` on rank 0 for every state tensor (collective).

        With ``modify``, what ``fn`` writes into the tensors on rank 0 reaches every rank:
        partitioned parameters through DeepSpeed (``modifier_rank=0``), everything else by a
        broadcast. A failure in ``fn`` stops the calls but not the gathers, and is raised on
        every rank at the end.
        """
        main = is_main_process()
        error: Exception | None = None
        for group in self.groups:
            with self._gathered(group, 0 if modify else None):
                if main and error is None:
                    try:
                        for entry in group:
                            fn(entry, entry.tensor())
                    except Exception as exc:
                        error = exc
            if modify and is_distributed():
                self._broadcast_unpartitioned(group)
        share_failure(error, what)

    def _broadcast_unpartitioned(self, group: list[StateEntry]) -> None:
        import torch.distributed as dist

        for entry in group:
            tensor = entry.tensor()
            if entry.is_buffer or not hasattr(tensor, "ds_id"):
                dist.broadcast(tensor.data, src=0)

    def write_checkpoint(self, folder: Path, max_shard_size: int) -> None:
        """Write the whole weights into ``folder`` as ``save_pretrained`` would (collective).

        Rank 0 streams one tensor at a time into a staging folder inside ``folder`` and moves the
        finished files in (shards first, index last); memory is one module's parameters.
        """
        folder = Path(folder)
        staging = folder / f".obim-consolidate.tmp-{os.getpid()}"
        writer: ShardedSafetensorsWriter | None = None

        def write(entry: StateEntry, tensor: Tensor) -> None:
            nonlocal writer
            if writer is None:
                staging.mkdir(parents=True)
                writer = ShardedSafetensorsWriter(staging, self.plan(), max_shard_size)
            writer.write(entry.name, tensor.detach().cpu().contiguous())

        def publish() -> None:
            assert writer is not None, "the model has no parameters"
            for file in writer.close():
                rename_durably(file, folder / file.name)

        try:
            self.visit(write, modify=False, what=f"gathering the weights to write {folder}")
            run_on_main(publish, f"writing the consolidated weights into {folder}")
        except BaseException:
            if writer is not None:
                writer.__exit__(*sys.exc_info())  # closes an open shard without finishing it
            raise
        finally:
            if is_main_process():
                shutil.rmtree(staging, ignore_errors=True)
        logger.info("wrote the consolidated weights of the live model into %s", folder)

    def load_checkpoint(self, folder: Path) -> None:
        """Copy the weights stored in ``folder`` into the live model on every rank (collective).

        Rank 0 reads each tensor and writes it into the gathered parameter; DeepSpeed then
        re-partitions it from rank 0. Raises :class:`CheckpointError` on every rank when a
        tensor is missing or has another shape.
        """
        folder = Path(folder)
        reader: CheckpointReader | None = None

        def load(entry: StateEntry, tensor: Tensor) -> None:
            nonlocal reader
            if reader is None:
                reader = open_checkpoint(folder)
            stored = reader.tensor_infos().get(entry.name)
            if stored is None or tuple(stored.shape) != tuple(tensor.shape):
                found = "missing" if stored is None else f"of shape {tuple(stored.shape)}"
                raise CheckpointError(
                    f"tensor {entry.name} is {found} in {folder}, but the live model has shape "
                    f"{tuple(tensor.shape)}; load only a merge of this model's own checkpoints"
                )
            tensor.data.copy_(reader.read(entry.name).to(device=tensor.device, dtype=tensor.dtype))

        try:
            self.visit(load, modify=True, what=f"loading {folder} into the live model")
        finally:
            if reader is not None:
                reader.close()
        logger.info("loaded %s into the live model", folder)


@contextmanager
def plain_model_loading() -> Iterator[None]:
    """Inside, ``from_pretrained`` builds an ordinary model even during a ZeRO-3 run.

    transformers partitions every model it builds while a ZeRO-3 configuration is registered,
    which is collective: one rank loading a model alone (to evaluate a merge) would wait
    forever for the others. The registration is lifted for the block and restored after.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    registered = ref() if ref is not None else None
    if registered is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(registered)
