"""Running a causal LM one decoder block at a time over calibration text, the hidden states kept at the
current block's input.

Statistics that need every batch before they are final (input Grams; the sequential RegMean merge)
cannot be collected batch by batch over the whole model without holding every layer's statistics at
once. Turned inside out, the loop holds one block's: the architecture's own code runs everything
before the first block (a "catcher" pre-hook on block 0 stores its arguments and stops the forward, as
GPTQ does), then each block runs over every batch and its outputs become the next block's inputs.
Memory: the hidden states of the calibration text (tokens × hidden size per stream), plus one block's
statistics. Used by the Gram collection (:meth:`~obim_trainer.calibration.gram_stats.GramStats.collect`)
and by sequential RegMean (:mod:`~obim_trainer.pipeline.sequential_regmean`, on a model whose blocks are
loaded one at a time).

The blocks are called with the arguments block 0 received (attention mask, position embeddings):
architectures whose blocks receive different ones (per-layer sliding windows) are found by
:func:`same_block_arguments` and must be run whole instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from obim_trainer.calibration.data import CalibrationSet
from obim_trainer.errors import ConfigError
from obim_trainer.pipeline import layout  # the module, read at call time: layout imports calibration in turn


class BlockWalkError(ConfigError):
    """The model cannot be run block by block (no block list found, or its forward skips block 0)."""


class Stop(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of a forward pass."""


@dataclass
class BlockInput:
    """A batch at a block's input: the hidden states, the block's other arguments, the non-pad token mask."""

    hidden: Tensor
    rest: tuple[Any, ...]
    kwargs: dict[str, Any]
    mask: Tensor


Stream = list[BlockInput]
"""One text's batches at the current block's input."""


@dataclass
class DecoderParts:
    """Where a causal LM's decoder blocks are, and what runs after them (the final norm)."""

    base_model: nn.Module
    """The module holding the block list (``model.model`` for Llama, ``model.transformer`` for GPT-2)."""
    blocks_name: str
    """The block list's name in the whole model (``model.layers``)."""
    blocks: nn.ModuleList
    tail: list[nn.Module]
    """Modules with parameters the base model registers after its blocks, applied in that order (Llama's ``norm``,
    GPT-2's ``ln_f``)."""


def decoder_parts(model: nn.Module) -> DecoderParts:
    """The decoder blocks of ``model`` and its final modules; :class:`BlockWalkError` when there is no block list."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    base_model = getattr(model, prefix) if prefix and hasattr(model, prefix) else model
    found = next(
        (
            (name, child)
            for name, child in base_model.named_children()
            if isinstance(child, nn.ModuleList) and len(child) > 0 and layout.BLOCK_INDEX.search(f"{name}.0.x")
        ),
        None,
    )
    if found is None:
        raise BlockWalkError(f"cannot find the decoder blocks of {type(base_model).__name__}")
    blocks_attr, blocks = found
    children = list(base_model.named_children())
    after = [name for name, _ in children].index(blocks_attr) + 1
    tail = [module for _name, module in children[after:] if any(True for _ in module.parameters())]
    blocks_name = f"{prefix}.{blocks_attr}" if base_model is not model else blocks_attr
    return DecoderParts(base_model, blocks_name, blocks, tail)


def catch_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    calibration: CalibrationSet,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> Stream:
    """The arguments of the first block for every batch (a pre-hook that stores them and stops the forward).

    Whatever the architecture computes before its blocks (embeddings, positions, the causal mask, rotary
    position embeddings) is computed by its own code, so the blocks can then be run one at a time. The
    hidden states are cast to ``dtype`` when given.
    """
    caught: list[tuple[Tensor, tuple[Any, ...], dict[str, Any]]] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, tuple(args[1:]), kwargs))
        raise Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    stream: Stream = []
    try:
        for ids, mask in calibration.batches(batch_size):
            mask = mask.to(device)
            with suppress(Stop):
                model(input_ids=ids.to(device), attention_mask=mask, use_cache=False)
            if not caught:
                raise BlockWalkError(
                    f"{type(model).__name__} did not call its first decoder block on a plain forward pass"
                )
            hidden, rest, kwargs = caught.pop()
            hidden = hidden if dtype is None else hidden.to(dtype)
            stream.append(BlockInput(hidden, rest, kwargs, mask.reshape(-1).bool()))
    finally:
        handle.remove()
    return stream


def run_block(block: nn.Module, batch: BlockInput) -> Tensor:
    """The block's output hidden states on one batch."""
    out = block(batch.hidden, *batch.rest, **batch.kwargs)
    return out[0] if isinstance(out, tuple) else out


def advanced(stream: Stream, hidden: Sequence[Tensor]) -> Stream:
    """``stream`` moved one block on: the same arguments with the block's outputs as hidden states."""
    return [BlockInput(h, b.rest, b.kwargs, b.mask) for b, h in zip(stream, hidden, strict=True)]


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return a is b or (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def same_block_arguments(model: nn.Module, parts: DecoderParts, ids: Tensor, mask: Tensor) -> bool:
    """Whether every block receives the arguments block 0 receives (besides the hidden states), on one batch
    run whole: what running the blocks one at a time with block 0's arguments assumes."""
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        seen.append((tuple(args[1:]) if args else (), rest))

    handles = [block.register_forward_pre_hook(hook, with_kwargs=True) for block in parts.blocks]
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return len(seen) == len(parts.blocks) and all(_same(seen[0], other) for other in seen[1:])
