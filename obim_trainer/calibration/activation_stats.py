"""Per-input-feature activation statistics of every Linear layer: the diagonal of OBM's Hessian.

For a layer y = Wx with the layer-wise MSE objective, H = 2XXᵀ (the paper's eq. 6), and OBM
needs only h_jj = 2·Σ_tokens x_j². Forward pre-hooks add Σx² over the real (non-padding)
tokens of each batch into a float32 vector per layer, in place: no per-token Python, no
stored activations. The same recorder works on a live model inside a training loop; under
data parallelism or ZeRO-3 each rank records its share and :meth:`ActivationStats.all_reduce`
sums them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from obim_trainer.calibration.data import CalibrationSet
from obim_trainer.errors import CalibrationError

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
TOKEN_COUNTS_KEY = "__token_counts__"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, int, int]]:
    """``(weight name, module, input axis of the weight, in_features)`` of every Linear and Conv1D."""
    conv1d = _conv1d_type()
    for name, module in model.named_modules():
        weight_name = _strip_wrappers(f"{name}.weight")
        if isinstance(module, nn.Linear):
            yield weight_name, module, 1, module.in_features
        elif conv1d is not None and isinstance(module, conv1d):
            yield weight_name, module, 0, module.nx if hasattr(module, "nx") else module.weight.shape[0]


@dataclass
class ActivationStats:
    """Σ x_j² and token counts per Linear weight, plus token frequencies for embeddings."""

    sq_sum: dict[str, Tensor] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    in_axis: dict[str, int] = field(default_factory=dict)
    token_counts: Tensor | None = None

    def input_sq_mean(self, name: str, weight_ndim: int = 2) -> Tensor | None:
        """mean_j(x²) shaped to broadcast against the weight: ``[1, in]`` (Linear) or ``[in, 1]`` (Conv1D)."""
        if name not in self.sq_sum:
            return None
        mean = self.sq_sum[name] / max(self.count[name], 1)
        shape = [1] * weight_ndim
        shape[self.in_axis[name]] = -1
        return mean.view(shape)

    @classmethod
    def collect(
        cls,
        model: nn.Module,
        calibration: CalibrationSet,
        *,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        progress: bool = True,
        desc: str = "activation statistics",
    ) -> ActivationStats:
        """Run ``model`` on the calibration samples (forward only) and record the statistics."""
        device = torch.device(device) if device is not None else next(model.parameters()).device
        was_training = model.training
        model.eval()
        recorder = ActivationRecorder(model)
        n_batches = -(-len(calibration.input_ids) // batch_size)
        try:
            with recorder.attached(), torch.no_grad():
                for ids, mask in tqdm(
                    calibration.batches(batch_size), total=n_batches, desc=desc, unit="batch", disable=not progress
                ):
                    recorder.set_token_mask(mask.to(device))
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        finally:
            model.train(was_training)
        stats = recorder.stats()
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(embeddings, "num_embeddings", None)
        if vocab:
            stats.token_counts = calibration.token_counts(vocab)
        return stats

    def all_reduce(self, group: Any = None) -> None:
        """Sum the statistics over all ranks (no-op outside ``torch.distributed``).

        Keys are visited in sorted order so every rank enters the same collectives in the same order.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        names = sorted(self.sq_sum)
        if names:
            flat = torch.cat([self.sq_sum[n].float() for n in names])
            dist.all_reduce(flat, group=group)
            offsets = 0
            for n in names:
                size = self.sq_sum[n].numel()
                self.sq_sum[n] = flat[offsets : offsets + size].clone()
                offsets += size
            counts = torch.tensor([self.count[n] for n in names], dtype=torch.float64)
            dist.all_reduce(counts, group=group)
            self.count = {n: int(c) for n, c in zip(names, counts.tolist(), strict=False)}
        if self.token_counts is not None:
            dist.all_reduce(self.token_counts, group=group)

    def save(self, path: Path, key: str, extra_metadata: dict[str, str] | None = None) -> None:
        """Write a small safetensors file atomically (temporary file, fsync, rename)."""
        from safetensors.torch import save_file

        tensors = {n: t.contiguous().float() for n, t in self.sq_sum.items()}
        if self.token_counts is not None:
            tensors[TOKEN_COUNTS_KEY] = self.token_counts.to(torch.int64).contiguous()
        metadata = {
            "key": key,
            "format_version": FORMAT_VERSION,
            "count": json.dumps(self.count),
            "in_axis": json.dumps(self.in_axis),
            **(extra_metadata or {}),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, expected_key: str | None = None) -> ActivationStats:
        """Read statistics written by :meth:`save`; :class:`CalibrationError` if unreadable or for another key."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            count = {k: int(v) for k, v in json.loads(meta["count"]).items()}
            in_axis = {k: int(v) for k, v in json.loads(meta["in_axis"]).items()}
        except Exception as exc:
            raise CalibrationError(f"statistics file {path} is unreadable ({exc}); delete it to recompute") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise CalibrationError(
                f"statistics file {path} has format {meta.get('format_version')}, not {FORMAT_VERSION}"
            )
        if expected_key is not None and meta.get("key") != expected_key:
            raise CalibrationError(f"statistics file {path} was computed for other inputs (key mismatch)")
        token_counts = tensors.pop(TOKEN_COUNTS_KEY, None)
        if set(tensors) != set(count) or set(tensors) != set(in_axis):
            raise CalibrationError(f"statistics file {path} is inconsistent; delete it to recompute")
        return cls(sq_sum=tensors, count=count, in_axis=in_axis, token_counts=token_counts)


class ActivationRecorder:
    """Forward pre-hooks that accumulate Σx² over non-padding tokens for every Linear/Conv1D of a model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._layers = list(linear_layers(model))
        self._sq: dict[str, Tensor] = {}
        self._count: dict[str, int] = {}
        self._axis: dict[str, int] = {}
        self._mask: Tensor | None = None
        self._warned: set[str] = set()

    def set_token_mask(self, attention_mask: Tensor | None) -> None:
        """The current batch's attention mask; tokens where it is 0 are not counted."""
        self._mask = None if attention_mask is None else attention_mask.reshape(-1).to(torch.float32)

    def _hook(self, name: str, in_features: int):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not torch.is_tensor(args[0]):
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if x.shape[-1] != in_features:
                return
            mask = self._mask
            if mask is not None and mask.numel() != x.shape[0]:
                if name not in self._warned:
                    self._warned.add(name)
                    logger.info("%s sees %d rows, not one per token; counting all of them", name, x.shape[0])
                mask = None
            sq = x.float().square()
            acc = self._sq.get(name)
            if acc is None or acc.device != x.device:
                acc = self._sq[name] = torch.zeros(in_features, dtype=torch.float32, device=x.device)
            if mask is None:
                acc.add_(sq.sum(0))
                self._count[name] = self._count.get(name, 0) + x.shape[0]
            else:
                acc.addmv_(sq.t(), mask.to(sq.device))
                self._count[name] = self._count.get(name, 0) + int(mask.sum())

        return hook

    @contextmanager
    def attached(self) -> Iterator[ActivationRecorder]:
        handles = []
        for name, module, axis, in_features in self._layers:
            self._axis[name] = axis
            handles.append(module.register_forward_pre_hook(self._hook(name, in_features)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._mask = None

    def stats(self) -> ActivationStats:
        """What was recorded so far (layers never called get zeros), on the CPU."""
        sq = {}
        for name, _module, _axis, in_features in self._layers:
            acc = self._sq.get(name)
            sq[name] = acc.cpu() if acc is not None else torch.zeros(in_features)
        return ActivationStats(
            sq_sum=sq,
            count={name: self._count.get(name, 0) for name in sq},
            in_axis={name: self._axis.get(name, axis) for name, _m, axis, _f in self._layers},
        )
