"""Diagonal empirical Fisher of every parameter: the statistics of Fisher merging (Matena & Raffel 2022,
eq. 3) and of a forgetting-aware OBIM saliency.

F(θ; texts) = mean_b (∇_θ L_b)² over mini-batches b of :data:`FISHER_BATCH_SIZE` calibration texts,
L_b the mean token cross-entropy of the batch (next-token labels, padding ignored). Under a
diagonal quadratic model of the loss, ½·F_i·δ_i² is what moving parameter i by δ_i costs on these
texts, which is how the merge methods weigh one model's values against another's.

The gradients come from :func:`torch.autograd.grad`, never from ``backward``: a live model's
``.grad`` (and so its gradient accumulation and optimizer step) is untouched, its train/eval mode
and ``requires_grad`` flags are restored. Gradients are taken in eval mode (no dropout) and
squared in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from obim_trainer.calibration.activation_stats import WRAPPER_PREFIXES, expert_layers
from obim_trainer.calibration.data import CalibrationSet
from obim_trainer.calibration.forward import device_batches, evaluation_mode, input_device, model_label
from obim_trainer.calibration.moe import stored_expert_slices
from obim_trainer.calibration.reduction import all_reduce_counts, all_reduce_sums
from obim_trainer.calibration.stats_file import StatsFile, write_stats_file
from obim_trainer.errors import CalibrationError

logger = logging.getLogger(__name__)

FISHER_BATCH_SIZE = 4
"""Texts per mini-batch b: the Fisher of the mean gradient of 4 texts, as the measurements behind issue 19 used."""
KIND = f"fisher-v2-b{FISHER_BATCH_SIZE}"
"""Names the kind, format and batch size of a Fisher file; part of its cache key. v2: fused MoE experts are
stored per expert tensor (v1 files lack those entries and are recomputed)."""
BATCHES = "batches"


def _parameter_name(name: str) -> str:
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


@contextmanager
def _all_trainable(params: list[Tensor]) -> Iterator[None]:
    """Every parameter requires grad inside (a frozen one has a Fisher too), the flags as before afterwards."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


@dataclass
class FisherStats:
    """Σ_b (∇L_b)² per parameter and the number of batches, in memory (after :meth:`collect`) or in a file.

    Keys are parameter names as the model names them (``model.layers.0.mlp.up_proj.weight``), except fused MoE
    experts: a fused parameter's F is sliced into the tensors the checkpoints store
    (``model.layers.0.block_sparse_moe.experts.3.w1.weight``), since F is per element and each stored tensor
    is some rows of one expert (:func:`split_fused_experts`).
    """

    batches: int
    sums: dict[str, Tensor] | None = None
    file: StatsFile | None = field(default=None, repr=False)
    names: frozenset[str] = frozenset()

    def fisher(self, name: str, rows: slice | None = None) -> Tensor | None:
        """F = mean_b (∇L_b)² of parameter ``name`` (only ``rows`` when given), float32 on the CPU."""
        if name not in self.names:
            return None
        if self.sums is not None:
            total = self.sums[name] if rows is None else self.sums[name][rows]
            return total / max(self.batches, 1)
        assert self.file is not None
        return self.file.read(name, rows).to(torch.float32)

    def is_finite(self) -> bool:
        """Whether every Fisher in memory is free of NaN/Inf."""
        return self.sums is None or all(bool(torch.isfinite(s).all()) for s in self.sums.values())

    @classmethod
    def collect(
        cls,
        model: nn.Module,
        calibration: CalibrationSet,
        *,
        batch_size: int = FISHER_BATCH_SIZE,
        device: str | torch.device | None = None,
        progress: bool = True,
        desc: str | None = None,
    ) -> FisherStats:
        """The empirical Fisher diagonal of every floating parameter of ``model`` on the calibration samples.

        A batch whose texts have no next token to predict (one token each) is skipped. The model is
        not moved; its ``.grad``, mode and ``requires_grad`` flags are as before afterwards.
        """
        device = input_device(model, device)
        named = [(_parameter_name(n), p) for n, p in model.named_parameters() if p.is_floating_point()]
        params = [p for _n, p in named]
        sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in named}
        batches = 0
        label = desc or f"Fisher diagonal of {model_label(model)}"
        with evaluation_mode(model), _all_trainable(params), torch.enable_grad():
            for ids, mask in device_batches(calibration, batch_size, device, progress=progress, desc=label):
                if int(mask.sum(dim=1).max()) < 2:
                    continue
                labels = ids.masked_fill(mask == 0, -100)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for (name, _p), grad in zip(named, grads, strict=True):
                    if grad is not None:
                        sums[name].add_(grad.float().square())
                batches += 1
        if batches == 0:
            raise CalibrationError("no calibration text is longer than one token; Fisher statistics need more text")
        sums = split_fused_experts(model, {n: s.cpu() for n, s in sums.items()})
        return cls(batches=batches, sums=sums, names=frozenset(sums))

    def all_reduce(self, group: Any = None) -> None:
        """Sum over all ranks of ``group`` (no-op outside ``torch.distributed``); before :meth:`save`."""
        if self.sums is None:
            raise CalibrationError("saved Fisher statistics cannot be reduced; reduce them before saving")
        self.sums = all_reduce_sums(self.sums, group)
        self.batches = all_reduce_counts({BATCHES: self.batches}, group)[BATCHES]

    def save(self, path: Path, key: str) -> None:
        """Write F per parameter (float32) atomically; from then on it is read from the file, one tensor at a time."""
        if self.sums is None:
            raise CalibrationError(f"these Fisher statistics are already stored in {self.file and self.file.path}")
        fishers = {n: (s / max(self.batches, 1)).contiguous() for n, s in self.sums.items()}
        metadata = {BATCHES: self.batches}
        write_stats_file(path, fishers, key, KIND, metadata)
        self.sums, self.file = None, StatsFile(Path(path), KIND, metadata)

    @classmethod
    def load(cls, path: Path, expected_key: str | None = None) -> FisherStats:
        """The Fisher statistics of a file written by :meth:`save` (its header only; tensors read on demand)."""
        from safetensors import safe_open

        file = StatsFile.open(path, KIND, expected_key)
        try:
            batches = int(file.metadata[BATCHES])
            with safe_open(str(path), framework="pt") as f:
                names = frozenset(f.keys())
        except Exception:
            raise CalibrationError(f"statistics file {path} is inconsistent; delete it to recompute") from None
        return cls(batches=batches, file=file, names=names)


def split_fused_experts(model: nn.Module, sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """``sums`` with each fused MoE expert parameter (``mlp.experts.gate_up_proj`` ``[E, d1, d2]``) replaced by
    its slices under the names the checkpoints store them: that expert's rows of the fused gradient², laid out
    as transformers' own save-time conversion lays them (:func:`~obim_trainer.calibration.moe.stored_expert_slices`),
    so Fisher merging finds one F per stored tensor. Parameters the files keep fused stay as they are."""
    slices = stored_expert_slices(model, expert_layers(model))
    split = {place.param for place in slices.values() if place.param in sums}
    out = {name: value for name, value in sums.items() if name not in split}
    for stored, place in slices.items():
        if place.param in split:
            fused = sums[place.param]
            rows = fused.reshape(-1, fused.shape[-1])[place.rows]
            out[stored] = (rows.T if place.transposed else rows).contiguous()
    return out
