"""Per-input-feature activation statistics of every Linear layer: the diagonal of OBM's Hessian.

For a layer y = Wx with the layer-wise MSE objective, H = 2XXᵀ (the paper's eq. 6), and OBM
needs only h_jj = 2·Σ_tokens x_j² (eq. 5). Forward pre-hooks add Σx² over the real
(non-padding) tokens of each batch into a float32 vector per layer, in place: no per-token
Python, no stored activations. :meth:`ActivationStats.collect` is the one collector: on a loaded
checkpoint in a merge, and on the live model inside a training loop, where under data parallelism or
ZeRO-3 each rank records its share and :meth:`ActivationStats.all_reduce` sums them. Each MoE expert
is a linear map over the tokens routed to it and gets its own statistics over those tokens
(:mod:`~obim_trainer.calibration.moe`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from obim_trainer.calibration.data import CalibrationSet
from obim_trainer.calibration.forward import input_device, model_label, record_forward_passes
from obim_trainer.calibration.moe import (
    FusedExperts,
    expert_of,
    fused_experts,
    routed_inputs_hook,
    router_in_features,
)
from obim_trainer.calibration.reduction import all_reduce_counts, all_reduce_sums
from obim_trainer.checkpoints.atomic import write_atomically
from obim_trainer.errors import CalibrationError

logger = logging.getLogger(__name__)

FORMAT_VERSION = "2"
"""Part of every statistics key (all kinds): 2 since MoE routers and experts have entries, so statistics cached
before (which lack them) are recomputed, never read as "no statistics"."""
TOKEN_COUNTS_KEY = "__token_counts__"
# DDP / DeepSpeed engines and torch.compile wrap the model; its own parameter names come after these
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency; the guard keeps hooks usable without it
        return None
    return Conv1D


def _strip_wrappers(name: str) -> str:
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def linear_layers(model: nn.Module, routers: bool = False) -> Iterator[tuple[str, nn.Module, int, int]]:
    """``(weight name, module, input axis of the weight, in_features)`` of every Linear and Conv1D, and of
    every MoE router with ``routers`` (statistics collect them; layer-wise solvers that rewrite modules do not).

    Sizes come from the module attributes, not the weight, which ZeRO-3 partitions to nothing.
    """
    conv1d = _conv1d_type()
    for name, module in model.named_modules():
        weight_name = _strip_wrappers(f"{name}.weight" if name else "weight")
        if isinstance(module, nn.Linear):
            yield weight_name, module, 1, module.in_features
        elif conv1d is not None and isinstance(module, conv1d):
            yield weight_name, module, 0, module.nx  # Conv1D stores its weight as [in, out]
        elif routers and (features := router_in_features(module)) is not None:
            yield weight_name, module, 1, features


def expert_layers(model: nn.Module) -> list[FusedExperts]:
    """Every fused MoE experts module of the model (see :mod:`~obim_trainer.calibration.moe`)."""
    found = (fused_experts(_strip_wrappers(name), module) for name, module in model.named_modules())
    return [experts for experts in found if experts is not None]


def statistics_layers(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(statistics key, input axis, in_features)`` of every linear map a recorder keeps statistics for:
    Linear/Conv1D weights, routers, and each expert of every fused experts module."""
    layers = [(name, axis, features) for name, _module, axis, features in linear_layers(model, routers=True)]
    for experts in expert_layers(model):
        layers += [(key, experts.in_axis, features) for key, features in experts.maps()]
    return layers


def warn_unreached_experts(
    counts: Sequence[Mapping[str, int]], consequence: str = "their weights are scored at random"
) -> int:
    """One warning saying how many MoE experts no calibration token reached (in any of the models whose token
    ``counts`` per statistics key are given), and what follows; returns their number.

    For OBIM their statistics are zero, so :func:`~obim_trainer.merging.saliency.obm_saliency` scores
    their weights at random, as the paper does for parameters without a Hessian estimate.
    """
    experts: set[tuple[str, int]] = set()
    unreached: set[tuple[str, int]] = set()
    for one in counts:
        for key, tokens in one.items():
            if (slice_of := expert_of(key)) is None:
                continue
            expert = (slice_of[0].rpartition(".")[0], slice_of[1])  # (experts module, e): both maps count alike
            experts.add(expert)
            if tokens == 0:
                unreached.add(expert)
    if unreached:
        logger.warning(
            "%d of %d experts in %d layer(s) got no calibration token; %s — give more calibration text",
            len(unreached),
            len(experts),
            len({module for module, _e in unreached}),
            consequence,
        )
    return len(unreached)


@dataclass
class ActivationStats:
    """Σ x_j² and token counts per Linear weight, plus token frequencies for embeddings.

    Keys are weight parameter names as the model names them (``model.layers.0.mlp.up_proj.weight``).
    """

    sq_sum: dict[str, Tensor] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    in_axis: dict[str, int] = field(default_factory=dict)
    token_counts: Tensor | None = None

    def input_sq_mean(self, name: str, weight_ndim: int = 2) -> Tensor | None:
        """mean_j(x²) shaped to broadcast against the weight: ``[1, in]`` (Linear) or ``[in, 1]`` (Conv1D).

        ``None`` for a weight without statistics. A layer that never ran (count 0) gets zeros.
        """
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
        desc: str | None = None,
        across_ranks: bool = False,
    ) -> ActivationStats:
        """Run ``model`` on the calibration samples (forward only, no labels) and record the statistics.

        The one collector: a merge calls it on a loaded checkpoint, the callback on the live model at
        a save with ``across_ranks`` (under DDP/ZeRO-3 each rank runs its share, then :meth:`all_reduce`).

        Args:
            model: A causal LM taking ``input_ids``/``attention_mask``; it is not moved.
            calibration: The tokenized samples.
            batch_size: Samples per forward pass.
            device: Where the batches go; the device of the model's first parameter by default.
            progress: Show a progress bar.
            desc: Progress-bar label; names the model (``config.name_or_path``) by default.
            across_ranks: Collective: every rank of the process group calls it with the same samples
                and gets the statistics of all of them (the order of float32 additions aside).
        """
        recorder = ActivationRecorder(model)
        ran = record_forward_passes(
            model,
            recorder,
            calibration,
            batch_size=batch_size,
            device=input_device(model, device),
            progress=progress,
            desc=desc or f"activation statistics of {model_label(model)}",
            across_ranks=across_ranks,
        )
        stats = recorder.stats()
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(embeddings, "num_embeddings", None)
        if vocab:
            stats.token_counts = ran.token_counts(vocab)
        if across_ranks:
            stats.all_reduce()
        unseen = [n for n, c in stats.count.items() if c == 0 and expert_of(n) is None]  # experts: the merge warns
        if unseen:
            logger.warning(
                "%d layer(s) never ran on the calibration data and have no activation statistics (e.g. %s)",
                len(unseen),
                unseen[0],
            )
        return stats

    def all_reduce(self, group: Any = None) -> None:
        """Sum the statistics over all ranks of ``group`` (no-op outside ``torch.distributed``).

        Every rank must hold the same layers (see :mod:`~obim_trainer.calibration.reduction`).
        """
        self.sq_sum = all_reduce_sums({n: t.float() for n, t in self.sq_sum.items()}, group)
        self.count = all_reduce_counts(self.count, group)
        if self.token_counts is not None:
            self.token_counts = all_reduce_sums({"tokens": self.token_counts.to(torch.int64)}, group)["tokens"]

    def save(self, path: Path, key: str, extra_metadata: dict[str, str] | None = None) -> None:
        """Write a small safetensors file atomically (temporary file, fsync, rename).

        A failure to write raises ``OSError`` and leaves no partial file behind.
        """
        from safetensors.torch import save

        tensors = {n: t.detach().float().cpu().contiguous() for n, t in self.sq_sum.items()}
        if self.token_counts is not None:
            tensors[TOKEN_COUNTS_KEY] = self.token_counts.to(torch.int64).cpu().contiguous()
        metadata = {
            **(extra_metadata or {}),
            "key": key,
            "format_version": FORMAT_VERSION,
            "count": json.dumps(self.count),
            "in_axis": json.dumps(self.in_axis),
        }
        write_atomically(Path(path), save(tensors, metadata=metadata))

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
                f"statistics file {path} has format {meta.get('format_version')}, not {FORMAT_VERSION}; "
                "delete it to recompute"
            )
        if expected_key is not None and meta.get("key") != expected_key:
            raise CalibrationError(f"statistics file {path} was computed for other inputs (key mismatch)")
        token_counts = tensors.pop(TOKEN_COUNTS_KEY, None)
        if set(tensors) != set(count) or set(tensors) != set(in_axis):
            raise CalibrationError(f"statistics file {path} is inconsistent; delete it to recompute")
        return cls(sq_sum=tensors, count=count, in_axis=in_axis, token_counts=token_counts)


class ActivationRecorder:
    """Forward pre-hooks that accumulate Σx² over non-padding tokens for every Linear/Conv1D and router of a
    model, and for each MoE expert over the tokens routed to it.

    Usage inside any loop (a Trainer callback, a ZeRO-3 engine's ``module``)::

        recorder = ActivationRecorder(model)
        with recorder.attached(), torch.no_grad():
            for batch in batches:
                recorder.set_token_mask(batch["attention_mask"])
                model(**batch)
        stats = recorder.stats()

    Attach it around forward passes only: with gradient checkpointing, a backward pass re-runs
    the forward and would count every token twice.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._layers = list(linear_layers(model, routers=True))
        self._experts = expert_layers(model)
        self._keys = statistics_layers(model)
        self._sq: dict[str, Tensor] = {}
        self._count: dict[str, int] = {}
        self._mask: Tensor | None = None
        self._mask_tokens = 0
        self._warned: set[str] = set()

    def set_token_mask(self, attention_mask: Tensor | None) -> None:
        """The current batch's attention mask; tokens where it is 0 are not counted (``None``: count all)."""
        if attention_mask is None:
            self._mask = None
            return
        self._mask = attention_mask.reshape(-1).to(torch.float32)
        self._mask_tokens = int(self._mask.sum())  # one device sync per batch, not one per layer

    def _hook(self, name: str, in_features: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs = args[0] if args else next(iter(kwargs.values()), None)
            if not torch.is_tensor(inputs):
                return
            x = inputs.detach().reshape(-1, in_features)
            mask = self._mask
            if mask is not None and mask.numel() != x.shape[0]:
                if name not in self._warned:  # a module called on a subset of the tokens
                    self._warned.add(name)
                    logger.info("%s sees %d rows, not one per token; counting all of them", name, x.shape[0])
                mask = None
            if mask is None:
                self._add(name, x)
                return
            acc = self._sq.get(name)
            if acc is None:
                acc = self._sq[name] = torch.zeros(in_features, dtype=torch.float32, device=x.device)
            acc.add_((x.float().square().t() @ mask.to(x.device)).to(acc.device))
            self._count[name] = self._count.get(name, 0) + self._mask_tokens

        return hook

    def _add(self, name: str, x: Tensor) -> None:
        """Σx² over every row of ``x`` (``[tokens, in_features]``, already restricted to the tokens that count)."""
        acc = self._sq.get(name)
        if acc is None:
            acc = self._sq[name] = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        acc.add_(x.float().square().sum(0).to(acc.device))
        self._count[name] = self._count.get(name, 0) + x.shape[0]

    def _kept(self, tokens: int, device: torch.device) -> Tensor | None:
        """The token mask of the batch for a call over all its ``tokens`` (an experts module's), else ``None``."""
        mask = self._mask
        return mask.to(device).bool() if mask is not None and mask.numel() == tokens else None

    @contextmanager
    def attached(self) -> Iterator[ActivationRecorder]:
        """Hooks on every Linear/Conv1D, router and experts module while inside; statistics keep accumulating
        over re-entries."""
        handles = [
            module.register_forward_pre_hook(self._hook(name, in_features), with_kwargs=True)
            for name, module, _axis, in_features in self._layers
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
            self._mask = None

    def stats(self) -> ActivationStats:
        """What was recorded so far, on the CPU (layers that never ran get zeros and count 0)."""
        return ActivationStats(
            sq_sum={
                name: self._sq[name].cpu() if name in self._sq else torch.zeros(in_features)
                for name, _axis, in_features in self._keys
            },
            count={name: self._count.get(name, 0) for name, *_ in self._keys},
            in_axis={name: axis for name, axis, _features in self._keys},
        )
