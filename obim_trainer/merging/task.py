"""What a merge method sees of one tensor.

The engine streams the model one tensor name at a time. For each name it builds
a :class:`TensorTask`: the base tensor, lazy access to the K checkpoint tensors,
and what the engine knows about the parameter (its kind, its decoder block, the
activation statistics of each checkpoint). Methods are pure functions of a task;
they never touch files, models or processes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor


class ParamKind(str, Enum):
    """How a parameter enters the network, which decides how OBIM scores it."""

    LINEAR = "linear"
    """Weight of an ``nn.Linear`` or transformers' ``Conv1D``: OBM saliency from activations."""
    EMBEDDING = "embedding"
    """Weight of an ``nn.Embedding``: random saliency, or token frequency on request."""
    OTHER = "other"
    """Norms, biases and anything else: random saliency ("random pruning" in the paper)."""


class Workspace:
    """Full-size scratch buffers reused from one tensor to the next, one per role.

    A fresh multi-megabyte tensor costs more than the arithmetic on it: the allocator maps new
    pages and the kernel zeroes every one of them on first touch. The engine keeps one workspace
    for a whole merge, so a method's temporaries (the float32 base, the scores, the selection's
    masks) are allocated once, at the size of the largest tensor, instead of once per tensor.
    A buffer handed out for a role stays valid until the same role is asked for again.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, role: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of ``shape`` for ``role``, grown (never shrunk) as tensors grow."""
        numel = math.prod(shape)
        key = (role, dtype, torch.device(device))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(tuple(shape))

    def holds(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` lives in one of the buffers (and would be overwritten by the next request)."""
        pointer = tensor.untyped_storage().data_ptr()
        return any(b.untyped_storage().data_ptr() == pointer for b in self._buffers.values())


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``parts`` (stable across runs and processes)."""
    text = "\x1f".join([str(seed), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


@dataclass
class TensorTask:
    """One tensor of the base and of each of the K checkpoints, plus what is known about it.

    Attributes:
        name: Tensor name as stored in the checkpoints (``model.layers.3.mlp.up_proj.weight``).
        kind: How the parameter is used (see :class:`ParamKind`).
        block_index: Index ``l`` of the decoder block the tensor belongs to, ``None`` outside blocks.
        seed: Seed for this tensor; methods draw randomness only through :meth:`generator`.
        input_sq_mean: Per checkpoint, the mean of x² per input feature of this layer, already
            shaped to broadcast against the weight (``[1, in]`` for ``nn.Linear``, ``[in, 1]`` for
            ``Conv1D``). ``None`` when the tensor is not a Linear weight or no statistics exist.
        token_counts: For embeddings, how often each row's token occurs in the calibration data,
            shaped ``[vocab, 1]``; ``None`` otherwise.
        in_axis: The input axis of a linear map's weight: 1 for ``nn.Linear`` (``[out, in]``), 0 for
            transformers' ``Conv1D`` (``[in, out]``).
        num_blocks: Number of decoder blocks L of the model (``None`` if unknown).
        base_gram: For a linear map's weight, the base's input Gram G_B = X_BᵀX_B/n_B (``[in, in]``,
            float64, on the compute device; old-language text when the calibration is per language).
            Maps that read the same input share one tensor. ``None`` when not asked for or not a linear map.
        checkpoint_grams: Per checkpoint, its input Gram G_k (new-language text when per language).
        base_fisher: The base's diagonal empirical Fisher at θ_B (old-language text when per language),
            float32, shaped like the tensor (rows restricted like it).
        checkpoint_fishers: Per checkpoint, its Fisher diagonal at θ_k (new-language text when per language).
        base_stored: θ_B in its stored dtype on the compute device; read-only (methods that copy
            values start from it without arithmetic). ``None``: only ``base_float32`` exists.
        workspace: Scratch buffers shared across the tensors of a merge (``None``: allocate).
        _view: θ_k as stored, where it lies (the engine: on the CPU), without taking it over (see
            :meth:`checkpoint_view`); ``None``: every access loads through ``_load``.
        _result_for: Memory for a result that starts as θ_k (see :meth:`result_from`); ``None``: ``_load``.
        base_float32: θ_B in float32, if the caller has it; otherwise :attr:`base` converts
            ``base_stored`` on first use, so a method that never computes with θ_B (iterative
            merging on the CPU) never pays for the conversion.
    """

    name: str
    _load: Callable[[int], Tensor] = field(repr=False)
    num_models: int
    kind: ParamKind = ParamKind.OTHER
    block_index: int | None = None
    seed: int = 0
    input_sq_mean: Sequence[Tensor | None] | None = None
    token_counts: Tensor | None = None
    in_axis: int = 1
    num_blocks: int | None = None
    base_gram: Tensor | None = None
    checkpoint_grams: Sequence[Tensor] | None = None
    base_fisher: Tensor | None = None
    checkpoint_fishers: Sequence[Tensor] | None = None
    base_stored: Tensor | None = None
    workspace: Workspace | None = None
    base_float32: Tensor | None = field(default=None, repr=False)
    _view: Callable[[int], Tensor] | None = field(default=None, repr=False)
    _result_for: Callable[[int], tuple[Tensor, bool]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.base_stored is None and self.base_float32 is None:
            raise ValueError(f"task {self.name}: give base_stored or base_float32")

    @classmethod
    def from_tensors(
        cls,
        name: str,
        base: Tensor,
        checkpoints: Sequence[Tensor],
        **kwargs: object,
    ) -> TensorTask:
        """Build a task from tensors already in memory (tests, the Python API)."""
        base32 = base.float()
        models = [t.to(device=base32.device) for t in checkpoints]
        return cls(
            name=name,
            base_float32=base32,
            _load=lambda k: models[k].clone(),
            _view=lambda k: models[k],
            num_models=len(models),
            base_stored=base.clone(),
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def base(self) -> Tensor:
        """θ_B in float32 on the compute device (converted from ``base_stored`` on first use, into the workspace)."""
        if self.base_float32 is None:
            assert self.base_stored is not None
            self.base_float32 = self.scratch("base").copy_(self.base_stored)
        return self.base_float32

    @property
    def _any_base(self) -> Tensor:
        return self.base_stored if self.base_stored is not None else self.base  # type: ignore[return-value]

    @property
    def shape(self) -> torch.Size:
        return self._any_base.shape

    @property
    def device(self) -> torch.device:
        return self._any_base.device

    def checkpoint(self, k: int) -> Tensor:
        """θ_k in float32 on the compute device: a fresh tensor the caller owns (loaded on each call).

        A 16-bit θ_k is converted from :meth:`checkpoint_view` (the conversion is the caller's tensor),
        so the merges of a sweep need no copy of it; a float32 one is taken over.
        """
        self._check_index(k)
        stored = self._view(k) if self._view is not None else None  # not moved yet: its dtype decides
        if stored is None or stored.dtype == torch.float32:
            return self.checkpoint_stored(k).to(torch.float32)
        return self.checkpoint_view(k).to(torch.float32)

    def checkpoint_stored(self, k: int) -> Tensor:
        """θ_k in its stored dtype on the compute device, a tensor the caller owns (loaded on each call).

        Methods that copy weights rather than compute with them (iterative merging writes θ_k
        itself at owned positions) use it to move half the bytes; casting the stored values
        to float32 and back is exact, so the result is the same.
        """
        self._check_index(k)
        return self._load(k)

    def checkpoint_view(self, k: int) -> Tensor:
        """θ_k in its stored dtype on the compute device, to read only: never write into it.

        In a sweep every merge reads the same θ_k (:func:`~obim_trainer.pipeline.engine.run_together`);
        a method that writes into θ_k takes it with :meth:`checkpoint_stored` instead, which then costs
        a copy for every merge of the sweep but the last. Reading costs nothing extra.
        """
        self._check_index(k)
        return self._load(k) if self._view is None else self._view(k).to(self.device)

    def result_from(self, k: int) -> tuple[Tensor, bool]:
        """Memory for a result that starts as θ_k (its stored dtype and shape, on the compute device; the caller's
        to keep), and whether it holds θ_k already.

        θ_k itself where taking it over costs no copy (``True``); in a sweep, whose merges share their
        inputs, an uninitialised buffer instead (``False``): the caller writes every position of it, as
        iterative merging's fused passes do when they copy the kept values in, which saves the copy.
        """
        self._check_index(k)
        if self._result_for is None:
            return self._load(k), True
        return self._result_for(k)

    def _check_index(self, k: int) -> None:
        if not 0 <= k < self.num_models:
            raise IndexError(f"checkpoint index {k} out of range for {self.num_models} checkpoints")

    def scratch(self, role: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """An uninitialised tensor shaped like the base for ``role``, from the workspace if there is one."""
        if self.workspace is None:
            return torch.empty(self.shape, dtype=dtype, device=self.device)
        return self.workspace.get(role, self.shape, dtype, self.device)

    def delta(self, k: int) -> Tensor:
        """Task vector δ_k = θ_k − θ_B in float32."""
        return self.checkpoint(k).sub_(self.base)

    def generator(self, *parts: object) -> torch.Generator:
        """A CPU generator seeded from this tensor's seed and ``parts`` (e.g. the checkpoint index)."""
        return torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, self.name, *parts))

    def rand_like_base(self, *parts: object) -> Tensor:
        """Uniform [0, 1) noise shaped like the tensor, reproducible on every device (drawn on the CPU).

        On the CPU it is drawn into the workspace's ``scores`` buffer (no fresh pages to fault in;
        random scores and a task vector's scores are never needed at once): valid until the next
        call or the next use of that buffer.
        """
        generator = self.generator(*parts)
        if self.device.type == "cpu":
            return torch.rand(self.shape, generator=generator, out=self.scratch("scores"))
        return torch.rand(self.shape, generator=generator, dtype=torch.float32).to(self.device)


@dataclass
class MergeOutput:
    """What a method returns for one tensor.

    Attributes:
        tensor: The merged tensor θ_M in float32, or in the inputs' dtype for methods that only copy
            values (iterative merging); the engine casts it to the output dtype.
        owned: Optional number of positions taken from each checkpoint (for OBIM, |mask_k|);
            used for ownership statistics in logs and tests.
        notes: Optional counts the engine sums over all tensors into ``obim_merge.json`` under the same keys
            (e.g. ``{"regmean_ridged_tensors": 1}`` for a linear map whose solve needed a ridge).
    """

    tensor: Tensor
    owned: list[int] | None = None
    notes: dict[str, int] | None = None
