"""One step of iterative merging in two passes over memory: select, then take.

A checkpoint's step in Algorithm 1 scores its task vector, selects its top ``count`` free
positions, copies θ_k there and marks them taken. With torch calls that is about fifteen
full-size passes; here it is two, in :mod:`~obim_trainer.merging.native_library`'s fused loops:

1. **select**: with ``hi``/``lo`` bracketing the threshold from a strided sample (as
   :func:`~obim_trainer.merging.topk.select_top` does), count the free scores above ``hi`` and
   bin the few percent between ``lo`` and ``hi`` in a histogram of their float bits (non-negative
   floats are ordered like their bits): the bin that holds the ``count``-th score;
2. **take**: one pass copies θ_k bit for bit where a free score lies above that bin and updates the
   free mask, and gathers the few scores inside the bin (a few hundredths of a percent), of which the
   best ones (ties to the lowest index) are taken after the pass.

Both passes serve several selections of the same scores at once (:func:`take_top_many`): the merges of
a sweep that differ only in their shares (OBIM at several total shares) have their own free masks and
counts but score θ_k alike, so each position is scored once per step for all of them, and the
per-tensor work outside the loops (sampling, bracketing, ranking) runs in one native call.

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
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from obim_trainer.merging.native_library import native_library
from obim_trainer.merging.random_scores import RandomScores
from obim_trainer.merging.saliency import ScaledSquare, Scores
from obim_trainer.merging.topk import SAMPLED_MIN, bracket_stride

_CANDIDATE_SHARE = 8  # room for 1/8 of the positions between hi and lo (a bracket holds 1-2%)
_MIN_SAMPLES, _MAX_SAMPLES = 1 << 12, 1 << 17
_GIVEN, _OBM_BF16, _OBM_F32, _RANDOM = 0, 1, 2, 3
_OBM_KINDS = {torch.bfloat16: _OBM_BF16, torch.float32: _OBM_F32}
_FOUND, _INVALID = 0, 2


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

    def arguments(self, theta: Tensor) -> tuple[int | None, ...]:
        """The loops' leading arguments: the scores' sources, with ``theta`` the tensor copied (and scored)."""
        pointers = (_ptr(self.given), theta.data_ptr(), _ptr(self.base), _ptr(self.scale))
        return (*pointers, self.kind, int(self.per_row), self.seed)


@dataclass
class Pick:
    """One selection of a step: take the ``count`` best of the ``num_free`` free positions (``free``: a bool
    mask, ``None``: all), copy θ there into ``result`` (``None``: θ is the result already, only the mask
    changes) and mark what stays free in ``free_out`` (may be ``free`` itself); ``0 < count < num_free``.
    ``prev``: the values ``result`` holds everywhere else, which the pass copies in (``result`` may then be
    uninitialised: a sweep's result needs no copy of the first checkpoint); ``None``: ``result`` holds them."""

    count: int
    free: Tensor | None
    num_free: int
    result: Tensor | None
    free_out: Tensor
    prev: Tensor | None = None


def _sample_stride(numel: int, cols: int) -> int:
    """About numel^(2/3) samples: ranking the sample and the bracket's candidates then costs least in total."""
    samples = min(_MAX_SAMPLES, max(_MIN_SAMPLES, round(numel ** (2 / 3))))
    return bracket_stride(numel, cols, samples)


def _ptr(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _pointers(tensors: Sequence[Tensor | None]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * len(tensors))(*map(_ptr, tensors))


def _on_cpu(*tensors: Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in tensors)


def _copyable(result: Tensor, theta: Tensor, prev: Tensor | None = None) -> bool:
    """Whether the take loop can copy ``theta`` (and ``prev``) into ``result`` as machine words."""
    same = result.dtype == theta.dtype and (prev is None or prev.dtype == result.dtype)
    return same and result.element_size() in (1, 2, 4, 8)


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


def _loops_source(scores: Scores, theta: Tensor) -> _Source | None:
    """The loops' view of ``scores`` of ``theta`` (materialized when the loops cannot compute them in place)."""
    source = _source(scores)
    if source is not None and source.theta is not None and source.theta.data_ptr() != theta.data_ptr():
        source = None  # scored against another tensor than the one copied: score in torch
    if source is None:
        if not isinstance(scores, ScaledSquare) or not _on_cpu(scores.vector.theta):
            return None
        source = _source(scores.materialize())  # a layout the fused scores do not cover
    return source


@dataclass(frozen=True)
class _Choice:
    """How a pick takes in the take pass: every free score >= ``threshold``, then the ``need`` best free scores
    in [``low``, ``threshold``) (ties to the lowest index)."""

    threshold: float = 0.0
    low: float = 0.0
    need: int = 0


def _choices(library: ctypes.CDLL, source: _Source, theta: Tensor, picks: Sequence[Pick]) -> list[_Choice | None]:
    """Per pick, how it takes exactly its ``count`` best free scores (``None``: its bracket missed)."""
    n = len(picks)
    numel = source.rows * source.cols
    threshold, low = (ctypes.c_float * n)(), (ctypes.c_float * n)()
    need, status = (ctypes.c_int64 * n)(), (ctypes.c_int * n)()
    frees = _pointers([None if p.free is None else p.free.view(-1) for p in picks])
    counts = (ctypes.c_int64 * n)(*(p.count for p in picks))
    num_free = (ctypes.c_int64 * n)(*(p.num_free for p in picks))
    invalid = library.obim_select(
        *source.arguments(theta), source.rows, source.cols, _sample_stride(numel, source.width), n, frees, counts,
        num_free, numel // _CANDIDATE_SHARE + 4096, threshold, low, need, status, torch.get_num_threads(),
    )  # fmt: skip
    if invalid == _INVALID:
        raise ValueError("scores must be non-negative and not NaN (saliencies are)")
    return [_Choice(threshold[v], low[v], need[v]) if status[v] == _FOUND else None for v in range(n)]


def _take(
    library: ctypes.CDLL, source: _Source | None, theta: Tensor, picks: Sequence[Pick], choices: Sequence[_Choice]
) -> None:
    """The take pass of ``picks`` with their ``choices`` (``source`` ``None``: take every free position)."""
    n, rows, cols = len(picks), theta.numel(), 1
    if source is not None:
        rows, cols = source.rows, source.cols
    library.obim_take_many(
        *(source.arguments(theta) if source is not None else (None, theta.data_ptr(), None, None, _GIVEN, 0, 0)),
        int(source is not None), n, _pointers([p.free for p in picks]), _pointers([p.free_out for p in picks]),
        (ctypes.c_float * n)(*(c.threshold for c in choices)), (ctypes.c_float * n)(*(c.low for c in choices)),
        (ctypes.c_int64 * n)(*(c.need for c in choices)),
        _pointers([p.result for p in picks]), _pointers([p.prev for p in picks]), rows, cols, theta.element_size(),
        torch.get_num_threads(),
    )  # fmt: skip


def take_top_many(scores: Scores, picks: Sequence[Pick], theta: Tensor) -> list[Tensor | None]:
    """Every pick of ``picks`` (see :class:`Pick`) on the same ``scores`` of ``theta``, each position scored once.

    Returns each pick's ``free_out``, or ``None`` for a pick the fused path did not make (no
    compiler, a GPU tensor, an unusual layout or dtype, a small tensor, a missed bracket), whose
    result and masks are then untouched: the caller selects it otherwise.

    Raises:
        ValueError: a score is negative or NaN.
    """
    library = native_library()
    missed: list[Tensor | None] = [None] * len(picks)
    if library is None or theta.numel() < SAMPLED_MIN or not _on_cpu(theta):
        return missed
    if not all(_copyable(theta if p.result is None else p.result, theta, p.prev) for p in picks):
        return missed
    if not all(_on_cpu(p.free, p.result, p.free_out, p.prev) for p in picks):
        return missed
    source = _loops_source(scores, theta)
    if source is None:
        return missed
    choices = _choices(library, source, theta, picks)
    made = [v for v, c in enumerate(choices) if c is not None]
    if made:
        _take(library, source, theta, [picks[v] for v in made], [c for c in choices if c is not None])
    return [picks[v].free_out if choices[v] is not None else None for v in range(len(picks))]


def take_top(
    scores: Scores,
    count: int,
    free: Tensor | None,
    num_free: int,
    result: Tensor | None,
    theta: Tensor,
    free_out: Tensor,
) -> Tensor | None:
    """Copy θ at the ``count`` free positions with the highest scores into ``result``; return the new free mask.

    One :class:`Pick` of :func:`take_top_many`: ``free`` (``None``: every position; ``num_free`` of
    them) and ``free_out`` (may be ``free`` itself) are bool masks shaped like the tensor; ``result``
    and ``theta`` share a dtype (``result`` ``None``: θ is the result already, only the mask
    changes), and ``0 < count < num_free``. Returns ``free_out``, or ``None`` when the fused path
    does not apply and nothing was written.

    Raises:
        ValueError: a score is negative or NaN.
    """
    return take_top_many(scores, [Pick(count, free, num_free, result, free_out)], theta)[0]


def copy_where(mask: Tensor, result: Tensor, theta: Tensor, prev: Tensor | None = None) -> bool:
    """``result[mask] = θ`` bit for bit in one pass, clearing ``mask`` (the last checkpoint takes what is left);
    with ``prev``, ``result = prev`` everywhere else in the same pass (``result`` may be uninitialised).

    Returns ``False`` when the fused path does not apply and nothing was written.
    """
    library = native_library()
    if library is None or not _copyable(result, theta, prev) or not _on_cpu(mask, result, theta, prev):
        return False
    _take(library, None, theta, [Pick(0, mask, 0, result, mask, prev)], [_Choice()])
    return True
