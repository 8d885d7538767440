"""One step of iterative merging in two passes over memory: collect, then take.

A checkpoint's step in Algorithm 1 scores its task vector, selects its top ``count`` free
positions, copies θ_k there and marks them taken. With torch calls that is about fifteen
full-size passes; here it is two, in :mod:`~obim_trainer.merging.native_library`'s fused loops:

1. **collect**: with ``hi``/``lo`` bracketing the threshold from a strided sample (as
   :func:`~obim_trainer.merging.topk.select_top` does), count the free scores above ``hi``
   and gather the few percent between ``lo`` and ``hi`` with their indices;
2. **take**: the exact threshold and tie cut come from the gathered scores; one pass copies θ_k
   bit for bit where a free score beats them and updates the free mask.

OBM scores (a :class:`~obim_trainer.merging.saliency.ScaledSquare`, eq. 5) are computed inside
both passes from θ_k, θ_B and x̄², tile by tile in cache, rounded as torch rounds them, and so
are random scores (:class:`~obim_trainer.merging.random_scores.RandomScores`); neither is ever
written out. The selected set is the one :func:`select_top` defines (exact count, ties to
the lowest flat index), so results are bit-identical to the torch path. Each function returns
``None``/``False`` when it does not apply (no compiler, a GPU tensor, an unusual layout or dtype, a
small tensor, a missed bracket) and the caller takes the torch path.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import Tensor

from obim_trainer.merging.native_library import native_library
from obim_trainer.merging.random_scores import RandomScores, uniform_at
from obim_trainer.merging.saliency import ScaledSquare, Scores
from obim_trainer.merging.task import Workspace
from obim_trainer.merging.topk import SAMPLED_MIN, bracket_from_sample, bracket_stride

_CANDIDATE_SHARE = 8  # room for 1/8 of the positions between hi and lo (a bracket holds 1-2%)
_MIN_SAMPLES, _MAX_SAMPLES = 1 << 12, 1 << 17
_GIVEN, _OBM_BF16, _OBM_F32, _RANDOM = 0, 1, 2, 3
_OBM_KINDS = {torch.bfloat16: _OBM_BF16, torch.float32: _OBM_F32}


@dataclass(frozen=True)
class _Source:
    """Where the native loops read scores: a float32 tensor, or θ_k, θ_B (same dtype) and a per-row/column scale.

    The loops split ``rows`` between threads: OBM scores go row by row (the scale follows the
    rows or columns), given scores are one flat row of positions per position.
    """

    given: Tensor | None
    theta: Tensor | None
    base: Tensor | None
    scale: Tensor | None
    kind: int
    per_row: bool
    seed: int
    rows: int
    cols: int
    width: int
    """The tensor's row width, which the sampling stride avoids sharing a factor with."""

    def arguments(self) -> tuple[int | None, int | None, int | None, int, int, int]:
        pointers = (_ptr(self.given), _ptr(self.base), _ptr(self.scale))
        return (*pointers, self.kind, int(self.per_row), self.seed)

    def sample(self, stride: int, free: Tensor | None) -> Tensor:
        """The scores of the free positions among every ``stride``-th one, in float32."""
        if self.given is not None:
            sample = self.given.view(-1)[::stride]
        elif self.kind == _RANDOM:
            sample = uniform_at(self.seed, torch.arange(0, self.rows * self.cols, stride))
        else:
            assert self.theta is not None and self.base is not None and self.scale is not None
            delta = torch.sub(self.theta.view(-1)[::stride], self.base.view(-1)[::stride])  # a new tensor
            positions = torch.arange(0, self.rows * self.cols, stride)
            scale = self.scale.view(-1)[positions // self.cols if self.per_row else positions % self.cols]
            sample = delta.square_().mul_(scale)
        return sample if free is None else sample[free[::stride]]


def _sample_stride(numel: int, cols: int) -> int:
    """About numel^(2/3) samples: ranking the sample and the bracket's candidates then costs least in total."""
    samples = min(_MAX_SAMPLES, max(_MIN_SAMPLES, round(numel ** (2 / 3))))
    return bracket_stride(numel, cols, samples)


def _buffer(workspace: Workspace | None, role: str, size: int, dtype: torch.dtype) -> Tensor:
    if workspace is None:
        return torch.empty(size, dtype=dtype)
    return workspace.get(role, (size,), dtype, torch.device("cpu"))


def _ptr(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _on_cpu(*tensors: Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in tensors)


def _copyable(result: Tensor, theta: Tensor) -> bool:
    """Whether the take loop can copy ``theta`` into ``result`` as machine words."""
    return result.dtype == theta.dtype and result.element_size() in (1, 2, 4, 8)


def _width(shape: torch.Size) -> int:
    return shape[-1] if len(shape) else 1


def _source(scores: Scores) -> _Source | None:
    """The loops' view of ``scores``, or ``None`` when they cannot read them in place."""
    if isinstance(scores, Tensor):
        if scores.dtype != torch.float32 or not _on_cpu(scores):
            return None
        return _Source(scores, None, None, None, _GIVEN, False, 0, scores.numel(), 1, _width(scores.shape))
    if isinstance(scores, RandomScores):
        if scores.device.type != "cpu":
            return None
        shape = scores.shape
        return _Source(None, None, None, None, _RANDOM, False, scores.seed, shape.numel(), 1, _width(shape))
    task, theta, scale = scores.vector.task, scores.vector.theta, scores.scale
    kind = _OBM_KINDS.get(theta.dtype)
    if kind is None or theta.dim() != 2 or scale.dtype != torch.float32:
        return None
    base = task.base_stored
    if base is None or base.dtype != theta.dtype:
        if kind != _OBM_F32:
            return None
        base = task.base  # a float32 checkpoint (ZeRO masters) against a 16-bit base
    if base.shape != theta.shape or not _on_cpu(theta, base, scale):
        return None
    rows, cols = theta.shape
    per_row = tuple(scale.shape) == (rows, 1)
    if not per_row and tuple(scale.shape) != (1, cols):
        return None
    return _Source(None, theta, base, scale, kind, per_row, 0, rows, cols, cols)


def _threshold(
    library: ctypes.CDLL, source: _Source, free: Tensor | None, count: int, num_free: int, workspace: Workspace | None
) -> tuple[float, int] | None:
    """``(threshold, tie_cut)`` selecting exactly ``count`` free scores, or ``None`` when the bracket missed."""
    numel = source.rows * source.cols
    hi, lo = bracket_from_sample(source.sample(_sample_stride(numel, source.width), free), count, num_free)
    cap = numel // _CANDIDATE_SHARE + 4096
    index = _buffer(workspace, "candidate-index", cap, torch.int64)
    value = _buffer(workspace, "candidate-value", cap, torch.float32)
    above, gathered = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    status = library.obim_collect(
        _ptr(source.given), _ptr(source.theta), *source.arguments()[1:], _ptr(free), source.rows, source.cols,
        hi, lo, cap, above.data_ptr(), gathered.data_ptr(), index.data_ptr(), value.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status == 2:
        raise ValueError("scores must be non-negative and not NaN (saliencies are)")
    need = count - int(above)
    size = int(gathered)
    if status != 0 or need < 0 or size < need:
        return None
    if need == 0:
        return hi, 0
    value, index = value[:size], index[:size]
    ranked = _buffer(workspace, "candidate-rank", size, torch.float32).copy_(value)
    threshold = library.obim_kth_largest(ranked.data_ptr(), size, need)
    ties_needed = need - int(torch.count_nonzero(value > threshold))
    return threshold, int(index[value == threshold][ties_needed - 1]) + 1


def take_top(
    scores: Scores,
    count: int,
    free: Tensor | None,
    num_free: int,
    result: Tensor | None,
    theta: Tensor,
    free_out: Tensor,
    workspace: Workspace | None = None,
) -> Tensor | None:
    """Copy θ at the ``count`` free positions with the highest scores into ``result``; return the new free mask.

    ``free`` (``None``: every position; ``num_free`` of them) and ``free_out`` (may be ``free``
    itself) are bool masks shaped like the tensor; ``result`` and ``theta`` share a dtype
    (``result`` ``None``: θ is the result already, only the mask changes), and
    ``0 < count < num_free``. Returns ``free_out``, or ``None`` when the fused path does not apply
    and nothing was written. ``workspace`` lends the buffers for the gathered candidates.

    Raises:
        ValueError: a score is negative or NaN.
    """
    library = native_library()
    if library is None or theta.numel() < SAMPLED_MIN:
        return None
    if not _copyable(theta if result is None else result, theta):
        return None
    if not _on_cpu(free, result, theta, free_out):
        return None
    source = _source(scores)
    if source is not None and source.theta is not None and source.theta.data_ptr() != theta.data_ptr():
        source = None  # scored against another tensor than the one copied: score in torch
    if source is None:
        if not isinstance(scores, ScaledSquare) or not _on_cpu(scores.vector.theta):
            return None
        source = _source(scores.materialize())  # a layout the fused scores do not cover
        if source is None:
            return None
    chosen = _threshold(library, source, None if free is None else free.view(-1), count, num_free, workspace)
    if chosen is None:
        return None
    threshold, tie_cut = chosen
    library.obim_take(
        *source.arguments(), 1, _ptr(free), free_out.data_ptr(), source.rows, source.cols, threshold, tie_cut,
        _ptr(result), theta.data_ptr(), theta.element_size(), torch.get_num_threads(),
    )  # fmt: skip
    return free_out


def copy_where(mask: Tensor, result: Tensor, theta: Tensor) -> bool:
    """``result[mask] = θ`` bit for bit in one pass, clearing ``mask`` (the last checkpoint takes what is left).

    Returns ``False`` when the fused path does not apply and nothing was written.
    """
    library = native_library()
    if library is None or not _copyable(result, theta) or not _on_cpu(mask, result, theta):
        return False
    library.obim_take(
        None, None, None, _GIVEN, 0, 0, 0, mask.data_ptr(), mask.data_ptr(), mask.numel(), 1, 0.0, 0, result.data_ptr(),
        theta.data_ptr(), result.element_size(), torch.get_num_threads(),
    )  # fmt: skip
    return True
