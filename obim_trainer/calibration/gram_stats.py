"""Input Grams G = XᵀX/n of every linear map: the statistics of RegMean (Jin et al. 2023, eq. 2).

For a linear map y = x·Wᵀ, the merged W that best reproduces each model's outputs on its own
inputs depends on those inputs only through their Gram matrix XᵀX (the normal equations of the
least-squares problem), so the forward pass over the calibration texts records one ``[in, in]``
matrix per map and nothing else. Forward pre-hooks add XᵀX of the real (non-padding) tokens of
each batch in float64: the sums run over hundreds of thousands of tokens, and a Gram that the
merge later inverts must not carry float32 rounding of that size.

Maps that read the same input (q/k/v of attention, gate/up of a gated MLP) share one Gram: a map
whose input is the very tensor the previous map read (the same object, in the same forward pass)
is recorded under the first map's name and costs nothing more. A 7B Llama has 4 distinct inputs
per block instead of 7.

Memory. A 7B Llama's Grams are about 22 GB in float32 (44 GB while summed in float64), more than a
merge may hold, so :meth:`GramStats.collect` never holds more than one decoder block's: it runs the
model block by block (:mod:`~obim_trainer.calibration.block_walk`, the hidden states of the
calibration text kept at the current block's input), and each block's Grams are written to the
statistics file (:class:`~obim_trainer.calibration.stats_file.StatsFileWriter`) before the next block
runs. The merge reads them back one shared input at a time. Results equal a whole-model pass: the
same float64 sums over the same tokens.

The same recorder works on a live model inside a training loop; under data parallelism each rank
records its share and :meth:`GramStats.all_reduce` sums them (``collect(..., all_reduce=True)`` sums
each block's over the ranks before writing it).
"""

from __future__ import annotations

import logging
import secrets
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from obim_trainer.calibration.activation_stats import (
    expert_layers,
    linear_layers,
    statistics_layers,
    warn_unreached_experts,
)
from obim_trainer.calibration.block_walk import (
    BlockWalkError,
    DecoderParts,
    Stop,
    Stream,
    advanced,
    catch_block_inputs,
    decoder_parts,
    run_block,
    same_block_arguments,
)
from obim_trainer.calibration.data import CalibrationSet
from obim_trainer.calibration.forward import device_batches, evaluation_mode, input_device, model_label
from obim_trainer.calibration.moe import expert_of, routed_inputs_hook
from obim_trainer.calibration.reduction import all_reduce_counts, all_reduce_sums
from obim_trainer.calibration.stats_file import (
    KEY_PLACEHOLDER,
    StatsFile,
    StatsFileWriter,
    header_room,
    move_stats_file,
    set_stats_key,
    write_stats_file,
)
from obim_trainer.errors import CalibrationError

logger = logging.getLogger(__name__)

KIND = "grams-v2"
"""Names the kind and format of a Gram file; part of its cache key, so another format is never read
(v2: collected block by block; files of v1 are recomputed, never misread)."""


@dataclass
class GramStats:
    """Input Grams of every linear map of a model, in memory (from a :class:`GramRecorder`) or in a file.

    Attributes:
        maps: Weight name → the name its Gram is stored under (the first map reading that input).
        count: Per stored Gram, the number of tokens n it sums over.
        in_axis: Weight name → input axis of the weight (1 for ``nn.Linear``, 0 for ``Conv1D``).
        sums: Per stored Gram, Σ XᵀX in float64, while in memory; ``None`` once in a file.
        file: The file the Grams are read from, one at a time.
        finite: False when a Gram held NaN/Inf (broken weights or an overflow); nothing was kept then.
    """

    maps: dict[str, str]
    count: dict[str, int]
    in_axis: dict[str, int]
    sums: dict[str, Tensor] | None = None
    file: StatsFile | None = field(default=None, repr=False)
    finite: bool = True
    _spool: Any = field(default=None, repr=False, compare=False)
    """While the file is a temporary one written by :meth:`collect`: the finalizer that removes it unless saved."""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_spool": None}  # workers read the file; only this process owns a temporary

    def group(self, name: str) -> str | None:
        """The name of the Gram ``name`` reads (shared by every map with the same input), ``None`` if unknown."""
        return self.maps.get(name)

    def gram(self, name: str) -> Tensor | None:
        """G = XᵀX/n of the input of weight ``name``, float64 on the CPU (zeros if the map never ran)."""
        group = self.maps.get(name)
        if group is None:
            return None
        if self.sums is not None:
            return self.sums[group] / max(self.count[group], 1)
        if self.file is None:
            raise CalibrationError("these Grams were not kept (they held NaN/Inf)")
        return self.file.read(group).to(torch.float64)

    def is_finite(self) -> bool:
        """Whether every Gram is free of NaN/Inf (broken weights or an overflow)."""
        return self.finite and (self.sums is None or all(bool(torch.isfinite(s).all()) for s in self.sums.values()))

    @classmethod
    def collect(
        cls,
        model: nn.Module,
        calibration: CalibrationSet,
        *,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        progress: bool = True,
        desc: str | None = None,
        spool_dir: Path | None = None,
        all_reduce: bool = False,
    ) -> GramStats:
        """Run ``model`` on the calibration samples (forward only, ``no_grad``, eval mode) and record the Grams.

        The model is run block by block and each block's Grams are written, as G = XᵀX/n in float32,
        to a temporary file in ``spool_dir`` (default: the system's temporary folder) that :meth:`save`
        moves into place; memory holds one block's Grams in float64. A model that cannot be run block
        by block (no block list, blocks called with different arguments, linear maps after the blocks
        other than the LM head) is run whole, holding all its Grams (with a warning). The model is not
        moved and its train/eval mode is restored. ``all_reduce``: sum each block's Grams over the ranks
        of ``torch.distributed`` before writing them (each rank measuring its share of the texts).
        """
        device = input_device(model, device)
        label = desc or f"input Grams of {model_label(model)}"
        layers = list(linear_layers(model, routers=True))
        spool = _Spool(Path(spool_dir or tempfile.gettempdir()), statistics_layers(model))
        # no_grad, not inference_mode: ZeRO-3's parameter-gathering hooks break on inference tensors
        with evaluation_mode(model), torch.no_grad(), spool.writing():
            parts = _walkable(model, calibration, batch_size, device, layers, all_reduce)
            run = _Pass(calibration, batch_size, device, progress, label, spool, all_reduce)
            if parts is None:
                _whole_model(model, run)
            else:
                _block_by_block(model, parts, run)
        stats = spool.stats()
        unseen = [n for n, g in stats.maps.items() if stats.count[g] == 0 and expert_of(n) is None]
        if unseen:
            logger.warning("%d linear map(s) never ran on the calibration data (e.g. %s)", len(unseen), unseen[0])
        consequence = f"their input Grams are zero ({label}): regmean gives them θ_B + mean δ/(1+c)"
        warn_unreached_experts([stats.count], consequence)
        return stats

    def all_reduce(self, group: Any = None) -> None:
        """Sum the Grams over all ranks of ``group`` (no-op outside ``torch.distributed``); before :meth:`save`."""
        if self.sums is None:
            raise CalibrationError(
                "Grams in a file cannot be reduced; reduce them before saving (or collect with all_reduce=True)"
            )
        self.sums = all_reduce_sums(self.sums, group)
        self.count = all_reduce_counts(self.count, group)

    def save(self, path: Path, key: str) -> None:
        """Store the Grams at ``path`` under ``key`` atomically; from then on they are read from that file.

        Grams collected by :meth:`collect` are already in a temporary file: it gets its key and is moved
        (renamed where possible). Grams in memory are written one at a time (float32), and the in-memory sums
        are dropped, which keeps a merge's memory at one Gram per model, whatever the model's size.
        """
        path = Path(path)
        if self._spool is not None:
            assert self.file is not None
            set_stats_key(self.file.path, key)
            move_stats_file(self.file.path, path)
            self._spool.detach()
            self._spool, self.file = None, StatsFile(path, KIND, self.file.metadata)
            return
        if self.sums is None:
            raise CalibrationError(f"these Grams are already stored in {self.file and self.file.path}")
        metadata = _metadata(self.maps, self.count, self.in_axis)
        grams = {g: _mean(s, self.count[g]) for g, s in self.sums.items()}
        write_stats_file(path, grams, key, KIND, metadata)
        self.sums, self.file = None, StatsFile(path, KIND, metadata)

    @classmethod
    def load(cls, path: Path, expected_key: str | None = None) -> GramStats:
        """The Grams of a file written by :meth:`save` (its header only; Grams are read on demand)."""
        file = StatsFile.open(path, KIND, expected_key)
        try:
            maps = {str(k): str(v) for k, v in file.metadata["maps"].items()}
            count = {str(k): int(v) for k, v in file.metadata["count"].items()}
            in_axis = {str(k): int(v) for k, v in file.metadata["in_axis"].items()}
        except (KeyError, AttributeError, TypeError, ValueError):
            raise CalibrationError(f"statistics file {path} is inconsistent; delete it to recompute") from None
        if not set(maps.values()) <= set(count) or set(maps) != set(in_axis):
            raise CalibrationError(f"statistics file {path} is inconsistent; delete it to recompute")
        return cls(maps=maps, count=count, in_axis=in_axis, file=file)


def _metadata(maps: dict[str, str], count: dict[str, int], in_axis: dict[str, int]) -> dict[str, Any]:
    return {"maps": maps, "count": count, "in_axis": in_axis}


def _mean(total: Tensor, count: int) -> Tensor:
    """G = XᵀX/n as stored: float32 (the merge solves in float64 again)."""
    return (total / max(count, 1)).float().contiguous()


class _Spool:
    """The temporary Gram file :meth:`GramStats.collect` writes block by block, and the names recorded so far."""

    def __init__(self, folder: Path, keys: list[tuple[str, int, int]]) -> None:
        names = [name for name, _axis, _features in keys]
        longest = max((len(n) for n in names), default=1)
        worst = _metadata({n: "x" * longest for n in names}, {n: 2**63 for n in names}, {n: 0 for n in names})
        self.room = 2 * header_room({n: (f, f) for n, _a, f in keys}, worst, KIND) + 4096
        self.path = folder / f".grams-{secrets.token_hex(8)}.safetensors"
        self.maps: dict[str, str] = {}
        self.count: dict[str, int] = {}
        self.in_axis: dict[str, int] = {}
        self.finite = True
        self.file: StatsFile | None = None
        self.writer: StatsFileWriter | None = None

    @contextmanager
    def writing(self) -> Iterator[_Spool]:
        self.writer = StatsFileWriter(self.path, self.room)
        with self.writer:
            yield self
            if self.finite:
                self.file = self.writer.finish(KEY_PLACEHOLDER, KIND, _metadata(self.maps, self.count, self.in_axis))
            else:
                self.writer.abort()

    def write(self, recorded: GramStats, prefix: str = "", all_reduce: bool = False) -> None:
        """Add a recorder's Grams (names relative to the module it watched, under ``prefix``); they leave memory."""
        assert recorded.sums is not None and self.writer is not None
        if all_reduce:
            recorded.all_reduce()
        assert recorded.sums is not None
        for name, group in recorded.maps.items():
            self.maps[prefix + name] = prefix + group
            self.in_axis[prefix + name] = recorded.in_axis[name]
        for group in list(recorded.sums):
            total = recorded.sums.pop(group)
            self.count[prefix + group] = recorded.count[group]
            if self.finite and not bool(torch.isfinite(total).all()):
                self.finite = False
            if self.finite:
                self.writer.add(prefix + group, _mean(total, recorded.count[group]))

    def stats(self) -> GramStats:
        stats = GramStats(maps=self.maps, count=self.count, in_axis=self.in_axis, file=self.file, finite=self.finite)
        if self.file is not None:
            stats._spool = weakref.finalize(stats, self.file.path.unlink, missing_ok=True)
        return stats


def _walkable(
    model: nn.Module,
    calibration: CalibrationSet,
    batch_size: int,
    device: torch.device,
    layers: list[tuple[str, nn.Module, int, int]],
    all_reduce: bool,
) -> DecoderParts | None:
    """The model's decoder parts if it can be run block by block, else ``None`` (the same answer on every rank).

    Block by block needs every linear map inside a block or the LM head (a map elsewhere may run anywhere in
    the forward pass) and every block called with block 0's arguments (checked on the longest sample)."""
    try:
        parts: DecoderParts | None = decoder_parts(model)
    except BlockWalkError:
        parts = None
    if parts is not None:
        head = _output_head(model)
        inside = {id(m) for m in parts.blocks.modules()} | ({id(head[1])} if head else set())
        if any(id(module) not in inside for _name, module, _axis, _features in layers):
            parts = None
    if parts is not None and calibration.input_ids:
        # the longest sample alone: masks that differ per layer (sliding windows) differ at its length if ever
        longest = max(calibration.input_ids, key=lambda ids: ids.numel())
        ids, mask = next(CalibrationSet([longest], calibration.pad_token_id).batches(1))
        if not same_block_arguments(model, parts, ids.to(device), mask.to(device)):
            parts = None
    if all_reduce:
        walkable = all_reduce_counts({"walk": int(parts is not None)}, None)["walk"]
        parts = parts if walkable == _world_size() else None
    return parts


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class _Pass:
    """One collection's texts, batching, device, progress bar, output and whether ranks sum their Grams."""

    calibration: CalibrationSet
    batch_size: int
    device: torch.device
    progress: bool
    label: str
    spool: _Spool
    all_reduce: bool


def _whole_model(model: nn.Module, run: _Pass) -> None:
    """Every Gram in one pass over the whole model (memory: all of them), for models not run block by block."""
    logger.warning(
        "%s cannot be run block by block; its input Grams are collected in one pass, all of them in memory", run.label
    )
    recorder = GramRecorder(model)
    with recorder.attached():
        batches = device_batches(run.calibration, run.batch_size, run.device, progress=run.progress, desc=run.label)
        for ids, mask in batches:
            recorder.set_token_mask(mask)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    run.spool.write(recorder.stats(), all_reduce=run.all_reduce)


def _block_by_block(model: nn.Module, parts: DecoderParts, run: _Pass) -> None:
    """Each block over every batch, its Grams written before the next runs, then the LM head on the final
    norm's outputs. Hidden states at the current block's input: one per token of the calibration text."""
    from tqdm.auto import tqdm

    stream = catch_block_inputs(model, parts.blocks[0], run.calibration, run.batch_size, run.device)
    for index, block in enumerate(tqdm(parts.blocks, desc=run.label, unit="block", disable=not run.progress)):
        recorder = GramRecorder(block)
        outputs = []
        with recorder.attached():
            for batch in stream:
                recorder.set_token_mask(batch.mask)
                outputs.append(run_block(block, batch))
        stream = advanced(stream, outputs)
        run.spool.write(recorder.stats(), f"{parts.blocks_name}.{index}.", run.all_reduce)
    _head(model, stream, parts, run.spool, run.all_reduce)


def _output_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The LM head and its name, ``None`` for a model without one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next(((n, m) for n, m in model.named_modules() if m is head), None) if head is not None else None


def _head(model: nn.Module, stream: Stream, parts: DecoderParts, spool: _Spool, all_reduce: bool) -> None:
    """The LM head's Gram: its inputs are the last hidden states after the final modules (no logits computed)."""
    found = _output_head(model)
    if found is None:
        return
    head_name, head = found
    recorder = GramRecorder(head)

    def stop(_module: nn.Module, _args: tuple[Any, ...]) -> None:
        raise Stop

    with recorder.attached():
        handle = head.register_forward_pre_hook(stop)  # after the recorder's hook: record, then stop
        try:
            for batch in stream:
                hidden = batch.hidden
                for module in parts.tail:
                    hidden = module(hidden)
                recorder.set_token_mask(batch.mask)
                with suppress(Stop):
                    head(hidden)
        finally:
            handle.remove()
    spool.write(recorder.stats(), f"{head_name}." if head_name else "", all_reduce)


class GramRecorder:
    """Forward pre-hooks that accumulate XᵀX over non-padding tokens for every Linear/Conv1D and router of a
    model, and for each MoE expert over the tokens routed to it (:mod:`~obim_trainer.calibration.moe`).

    Usage inside any loop, like :class:`~obim_trainer.calibration.activation_stats.ActivationRecorder`::

        recorder = GramRecorder(model)
        with recorder.attached(), torch.no_grad():
            for batch in batches:
                recorder.set_token_mask(batch["attention_mask"])
                model(**batch)
        grams = recorder.stats()

    Attach it around forward passes only (a backward pass with gradient checkpointing re-runs the forward).
    """

    def __init__(self, model: nn.Module) -> None:
        layers = list(linear_layers(model, routers=True))
        self._layers = [(name, axis, features) for name, _module, axis, features in layers]
        self._modules = [module for _name, module, _axis, _features in layers]
        self._experts = expert_layers(model)
        self._keys = statistics_layers(model)  # the layers, then each expert's two maps (each its own Gram)
        self._sums: dict[str, Tensor] = {}
        self._count: dict[str, int] = {}
        self._group: dict[str, str] = {}
        self._last: tuple[Tensor, str] | None = None  # the input the previous map read, and that map
        self._rows: Tensor | None = None
        self._mask_numel = 0
        self._warned: set[str] = set()

    def set_token_mask(self, attention_mask: Tensor | None) -> None:
        """The current batch's attention mask; tokens where it is 0 are not counted (``None``: count all)."""
        self._last = None
        if attention_mask is None:
            self._rows = None
            return
        flat = attention_mask.reshape(-1)
        self._rows, self._mask_numel = flat.nonzero().squeeze(1), flat.numel()

    def _shared_group(self, name: str, inputs: Tensor) -> str | None:
        """The Gram ``name`` shares with the previous map when both read this very tensor, else ``None``."""
        last, self._last = self._last, (inputs, name)
        reads_previous = last is not None and last[0] is inputs
        known = self._group.get(name)
        if known is None:
            known = self._group[name] = self._group[last[1]] if reads_previous and last else name
        if known == name:
            return None
        if not reads_previous:
            raise CalibrationError(
                f"{name} shared its input with {known} in an earlier forward pass but not in this one; input Grams "
                "need a model whose layers read their inputs the same way in every pass"
            )
        return known

    def _accumulate(self, group: str, inputs: Tensor, in_features: int) -> None:
        x = inputs.detach().reshape(-1, in_features)
        rows = self._rows
        if rows is not None and self._mask_numel != x.shape[0]:
            if group not in self._warned:  # e.g. an MoE expert sees only its routed tokens
                self._warned.add(group)
                logger.info("%s sees %d rows, not one per token; counting all of them", group, x.shape[0])
            rows = None
        if rows is not None:
            x = x.index_select(0, rows.to(x.device))
        self._add(group, x)

    def _add(self, group: str, x: Tensor) -> None:
        """XᵀX in float64 over every row of ``x`` (``[tokens, in_features]``, the tokens that count)."""
        x = x.to(torch.float64)
        acc = self._sums.get(group)
        if acc is None:
            acc = self._sums[group] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        acc.addmm_(x.T, x)
        self._count[group] = self._count.get(group, 0) + x.shape[0]

    def _hook(self, name: str, in_features: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs = args[0] if args else next(iter(kwargs.values()), None)
            if torch.is_tensor(inputs) and self._shared_group(name, inputs) is None:
                self._accumulate(name, inputs, in_features)

        return hook

    def _kept(self, tokens: int, device: torch.device) -> Tensor | None:
        """The batch's non-padding tokens as a mask for a call over all its ``tokens`` (an experts module's)."""
        if self._rows is None or self._mask_numel != tokens:
            return None
        keep = torch.zeros(tokens, dtype=torch.bool, device=device)
        keep[self._rows.to(device)] = True
        return keep

    @contextmanager
    def attached(self) -> Iterator[GramRecorder]:
        """Hooks on every Linear/Conv1D, router and experts module while inside; the Grams keep accumulating
        over re-entries."""
        handles = [
            module.register_forward_pre_hook(self._hook(name, features), with_kwargs=True)
            for (name, _axis, features), module in zip(self._layers, self._modules, strict=True)
        ]
        handles += [
            experts.module.register_forward_pre_hook(
                routed_inputs_hook(experts, self._kept, self._add), with_kwargs=True
            )
            for experts in self._experts
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._last = None

    def stats(self) -> GramStats:
        """What was recorded so far, on the CPU (maps that never ran get a zero Gram and count 0)."""
        maps = {name: self._group.get(name, name) for name, _axis, _features in self._keys}
        features = {name: f for name, _axis, f in self._keys}
        sums = {
            g: self._sums[g].cpu() if g in self._sums else torch.zeros(features[g], features[g], dtype=torch.float64)
            for g in dict.fromkeys(maps.values())
        }
        return GramStats(
            maps=maps,
            count={g: self._count.get(g, 0) for g in sums},
            in_axis={name: axis for name, axis, _features in self._keys},
            sums=sums,
        )
