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

The same recorder works on a live model inside a training loop; under data parallelism each rank
records its share and :meth:`GramStats.all_reduce` sums them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from obim_trainer.calibration.data import CalibrationSet
from obim_trainer.calibration.forward import device_batches, evaluation_mode, input_device, model_label
from obim_trainer.calibration.moe import FusedExperts, expert_key, expert_of, routing_arguments
from obim_trainer.calibration.reduction import all_reduce_counts, all_reduce_sums
from obim_trainer.calibration.stats_file import StatsFile, write_stats_file
from obim_trainer.errors import CalibrationError

logger = logging.getLogger(__name__)

KIND = "grams-v1"
"""Names the kind and format of a Gram file; part of its cache key, so another format is never read."""


@dataclass
class GramStats:
    """Input Grams of every linear map of a model, in memory (after :meth:`collect`) or in a file.

    Attributes:
        maps: Weight name → the name its Gram is stored under (the first map reading that input).
        count: Per stored Gram, the number of tokens n it sums over.
        in_axis: Weight name → input axis of the weight (1 for ``nn.Linear``, 0 for ``Conv1D``).
        sums: Per stored Gram, Σ XᵀX in float64, while in memory; ``None`` once saved.
        file: The file the Grams are read from, one at a time, once saved or loaded.
    """

    maps: dict[str, str]
    count: dict[str, int]
    in_axis: dict[str, int]
    sums: dict[str, Tensor] | None = None
    file: StatsFile | None = field(default=None, repr=False)

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
        assert self.file is not None
        return self.file.read(group).to(torch.float64)

    def is_finite(self) -> bool:
        """Whether every Gram in memory is free of NaN/Inf (broken weights or an overflow)."""
        return self.sums is None or all(bool(torch.isfinite(s).all()) for s in self.sums.values())

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
    ) -> GramStats:
        """Run ``model`` on the calibration samples (forward only, ``no_grad``, eval mode) and record the Grams.

        The model is not moved and its train/eval mode is restored. Memory: every Gram of the model
        in float64 while recording (twice its file size).
        """
        device = input_device(model, device)
        recorder = GramRecorder(model)
        label = desc or f"input Grams of {model_label(model)}"
        # no_grad, not inference_mode: ZeRO-3's parameter-gathering hooks break on inference tensors
        with evaluation_mode(model), recorder.attached(), torch.no_grad():
            for ids, mask in device_batches(calibration, batch_size, device, progress=progress, desc=label):
                recorder.set_token_mask(mask)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
        stats = recorder.stats()
        unseen = [n for n, g in stats.maps.items() if stats.count[g] == 0 and expert_of(n) is None]
        if unseen:
            logger.warning("%d linear map(s) never ran on the calibration data (e.g. %s)", len(unseen), unseen[0])
        warn_unreached_experts([stats.count], f"their input Grams are zero ({label})")
        return stats

    def all_reduce(self, group: Any = None) -> None:
        """Sum the Grams over all ranks of ``group`` (no-op outside ``torch.distributed``); before :meth:`save`."""
        if self.sums is None:
            raise CalibrationError("saved Grams cannot be reduced; reduce them before saving")
        self.sums = all_reduce_sums(self.sums, group)
        self.count = all_reduce_counts(self.count, group)

    def save(self, path: Path, key: str) -> None:
        """Write G = XᵀX/n per stored Gram (float32) atomically; from then on the Grams are read from the file.

        Dropping the in-memory sums keeps a merge's memory at one Gram per model, whatever the model's size.
        """
        if self.sums is None:
            raise CalibrationError(f"these Grams are already stored in {self.file and self.file.path}")
        grams = {g: (s / max(self.count[g], 1)).float().contiguous() for g, s in self.sums.items()}
        metadata = {"maps": self.maps, "count": self.count, "in_axis": self.in_axis}
        write_stats_file(path, grams, key, KIND, metadata)
        self.sums, self.file = None, StatsFile(Path(path), KIND, metadata)

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

    def _experts_hook(self, experts: FusedExperts) -> Callable[..., None]:
        """Each expert's two Grams over the real tokens routed to it; an expert's input is never shared."""
        first, down = experts.params()

        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            routing = routing_arguments(args, kwargs)
            if routing is None:
                return
            hidden, index = routing
            keep = None
            if self._rows is not None and self._mask_numel == index.shape[0]:
                keep = torch.zeros(index.shape[0], dtype=torch.bool, device=hidden.device)
                keep[self._rows.to(hidden.device)] = True
            for e, x, activation in experts.routed_inputs(hidden.detach(), index, keep):
                self._add(expert_key(first, e), x)
                self._add(expert_key(down, e), activation)

        return hook

    @contextmanager
    def attached(self) -> Iterator[GramRecorder]:
        """Hooks on every Linear/Conv1D, router and experts module while inside; the Grams keep accumulating
        over re-entries."""
        handles = [
            module.register_forward_pre_hook(self._hook(name, features), with_kwargs=True)
            for (name, _axis, features), module in zip(self._layers, self._modules, strict=True)
        ]
        handles += [
            experts.module.register_forward_pre_hook(self._experts_hook(experts), with_kwargs=True)
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
