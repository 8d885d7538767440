"""Iterative merging (IM): mutually exclusive selection of each checkpoint's most salient positions.

Algorithm 1 of the paper: the merged mask M starts empty; for k in the order O, the positions
already in M are removed from k's candidates, k takes the top n_k share of the tensor by its
saliency, and those positions join M. The merged tensor is θ_M = θ_B + Σ_k δ_k·mask_k (eq. 8).
The masks are disjoint, so no position is ever averaged and no checkpoint's change is diluted
by another's; positions outside M keep the base (Σ n_k ≤ 1, the footnote to eq. 8).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from obim_trainer.merging.fused_take import Pick, take_top_many
from obim_trainer.merging.fused_take import copy_where as fused_copy_where
from obim_trainer.merging.saliency import SaliencyFn, Scores, TaskVector, scores_tensor
from obim_trainer.merging.task import MergeOutput, TensorTask
from obim_trainer.merging.topk import apportion, select_top


def iterative_merge(
    task: TensorTask, ratios: Sequence[float], order: Sequence[int], saliency: SaliencyFn
) -> MergeOutput:
    """Merge one tensor by Algorithm 1 / eq. 8.

    Args:
        task: The tensor and lazy access to the checkpoints.
        ratios: Share n_k of the whole tensor for each checkpoint k (indexed by k, not by order).
        order: Checkpoint indices in merge order for this tensor.
        saliency: Scores of checkpoint k's positions (see :mod:`obim_trainer.merging.saliency`).

    Returns:
        The merged tensor and ``owned[k]`` = number of positions taken from checkpoint k, which
        is :func:`~obim_trainer.merging.topk.apportion` of the ratios in this order.

    Each checkpoint is read in place in its stored dtype (:meth:`TensorTask.checkpoint_view`). At
    owned positions θ_k itself is copied, which equals θ_B + δ_k without the rounding of that sum,
    so the result stays in the inputs' (promoted) dtype: no arithmetic touches it. The result holds
    the first checkpoint's θ (its positions then need no copy): that tensor taken over where it
    costs no copy, else filled in by the first write into it (:meth:`TensorTask.result_from`); the
    others' positions are copied in, and positions nobody owns (Σ n_k < 1) get θ_B at the end; θ_B
    itself is only read.
    Scores are float32, computed in place by the fused loops or in one scratch buffer; the free
    mask and the selection's masks are bool scratch buffers. A checkpoint whose count equals the
    positions still free takes all of them without being scored.
    """
    return iterative_merge_many(task, [ratios], order, saliency)[0]


@dataclass
class _Merge:
    """One merge of :func:`iterative_merge_many` in progress: its counts in order, result and free mask."""

    counts: list[int]
    num_free: int
    owned: list[int]
    role: str
    """The workspace role of its free mask."""
    result: Tensor | None = None
    kept: Tensor | None = None
    """While ``result`` is still unwritten (an uninitialised buffer, see :meth:`TensorTask.result_from`): θ of
    the first checkpoint it took from (read only), which the first write copies in wherever nothing is taken."""
    holds_theta: bool = False
    """It started in this step: its values are θ_k everywhere already."""
    free: Tensor | None = None  # None: every position is free


def iterative_merge_many(
    task: TensorTask, ratios: Sequence[Sequence[float]], order: Sequence[int], saliency: SaliencyFn
) -> list[MergeOutput]:
    """:func:`iterative_merge` of one tensor for several share vectors at once (a sweep's merges that differ
    only in their shares), each output equal to its own :func:`iterative_merge`, bit for bit.

    Checkpoint k's scores do not depend on the shares, so each step scores θ_k once for every merge
    and the fused loops select each merge's positions (its own free mask and count) in the same passes
    (:func:`~obim_trainer.merging.fused_take.take_top_many`). θ_k is only read; a merge's result is
    :meth:`TensorTask.result_from` its first checkpoint: in a sweep an uninitialised buffer, which the
    first write into it fills with that checkpoint's values as it goes, instead of a copy.
    """
    if len(set(order)) != len(order) or not set(order) <= set(range(task.num_models)):
        raise ValueError(f"merge order {list(order)} must list distinct checkpoint indices < {task.num_models}")
    base = task.base_stored if task.base_stored is not None else task.base
    numel = base.numel()
    merges = [
        _Merge(apportion(numel, [shares[k] for k in order]), numel, [0] * task.num_models, f"free-{i}")
        for i, shares in enumerate(ratios)
    ]
    for step, k in enumerate(order):
        active = [m for m in merges if m.counts[step]]
        if not active:
            continue
        _step_all(task, k, step, base.dtype, active, saliency)
        for m in active:
            m.num_free -= m.counts[step]
            m.owned[k] = m.counts[step]
            m.holds_theta = False
    return [MergeOutput(tensor=_finish(task, m, base), owned=m.owned) for m in merges]


def _finish(task: TensorTask, m: _Merge, base: Tensor) -> Tensor:
    """The merged tensor: θ_B where nobody took (Σ n_k < 1)."""
    if m.result is None:
        return base.clone()
    if m.num_free:
        _take_rest(task, m, base.to(m.result.dtype))
    else:
        _fill(m, _unwritten(m))
    return m.result


def _step_all(
    task: TensorTask, k: int, step: int, base_dtype: torch.dtype, active: Sequence[_Merge], saliency: SaliencyFn
) -> None:
    for theta, group in _thetas(task, k, base_dtype, active).items():
        _step(task, k, [(m, m.counts[step]) for m in group], theta, saliency)


def _thetas(task: TensorTask, k: int, base_dtype: torch.dtype, active: Sequence[_Merge]) -> dict[Tensor, list[_Merge]]:
    """θ_k for this step's ``active`` merges, in the (promoted) dtype of their results, and the merges of each.

    A merge that starts here takes its result from θ_k (:meth:`TensorTask.result_from`, converted when
    the base's dtype promotes the checkpoint's); a result holding θ_k itself also serves as the step's
    θ_k (nothing writes into it during the step), which is otherwise only read
    (:meth:`TensorTask.checkpoint_view`, only when needed). Dtypes agree unless the checkpoints are
    stored in different dtypes.
    """
    views: list[Tensor] = []

    def view() -> Tensor:
        if not views:
            views.append(task.checkpoint_view(k))
        return views[0]

    thetas: dict[torch.dtype, Tensor] = {}
    stored: torch.dtype | None = None
    for m in active:
        if m.result is None:  # starts here
            m.holds_theta = True
            m.result, holds = task.result_from(k)
            m.kept, stored = (None if holds else view()), m.result.dtype
            result = _promoted(m, torch.promote_types(base_dtype, stored))
            if m.kept is None:
                thetas.setdefault(result.dtype, result)
    stored = stored or view().dtype
    groups: dict[Tensor, list[_Merge]] = {}
    for m in active:
        assert m.result is not None
        dtype = _promoted(m, torch.promote_types(m.result.dtype, stored)).dtype
        if dtype not in thetas:
            thetas[dtype] = view().to(dtype)
        groups.setdefault(thetas[dtype], []).append(m)
    return groups


def _promoted(m: _Merge, dtype: torch.dtype) -> Tensor:
    """``m``'s result, converted to ``dtype`` if it is not in it (its unwritten values filled in first)."""
    assert m.result is not None
    if m.result.dtype != dtype:
        _fill(m, _unwritten(m))
        m.result = m.result.to(dtype)
    return m.result


def _step(task: TensorTask, k: int, merges: Sequence[tuple[_Merge, int]], theta: Tensor, saliency: SaliencyFn) -> None:
    """Checkpoint k's step for ``merges`` (each with its count), whose results share θ_k's dtype.

    A merge whose count is all its free positions takes them unscored; the others select theirs by
    k's saliency, scored once for all of them.
    """
    scored = []
    for m, count in merges:
        if count < m.num_free:
            scored.append((m, count))
        elif not m.holds_theta:
            _take_rest(task, m, theta)
    if scored:
        scores = saliency(task, k, TaskVector(task, theta))
        _take_top_many(task, scores, scored, theta)


def _unwritten(m: _Merge) -> Tensor | None:
    """The values ``m``'s result must get wherever the next write takes nothing (``None``: it holds them)."""
    kept, m.kept = m.kept, None
    return kept


def _fill(m: _Merge, prev: Tensor | None) -> None:
    """The result holds ``prev`` everywhere (before a torch path writes into it; ``None``: it does already)."""
    if prev is not None:
        assert m.result is not None
        m.result.copy_(prev)


def _take_top_many(task: TensorTask, scores: Scores, merges: Sequence[tuple[_Merge, int]], theta: Tensor) -> None:
    """Each merge's result = θ_k at its ``count`` best free positions by ``scores``; its free mask updated.

    The fused native passes when they apply (:func:`~obim_trainer.merging.fused_take.take_top_many`),
    else :func:`select_top` and a masked copy: the same positions either way.
    """
    picks = []
    for m, count in merges:
        result, prev = (None, None) if m.holds_theta else (m.result, _unwritten(m))
        picks.append(Pick(count, m.free, m.num_free, result, task.scratch(m.role, torch.bool), prev))
    fused = take_top_many(scores, picks, theta)
    flat = None
    for (m, count), pick, free in zip(merges, picks, fused, strict=True):
        if free is None:
            flat = scores_tensor(scores) if flat is None else flat
            mask = select_top(flat, count, m.free, num_available=m.num_free, scratch=_bool_scratch(task))
            if pick.result is not None:
                _fill(m, pick.prev)
                _copy_where(task, pick.result, theta, mask)
            free = torch.logical_not(mask, out=pick.free_out) if m.free is None else m.free.bitwise_xor_(mask)
        m.free = free


def _take_rest(task: TensorTask, m: _Merge, theta: Tensor) -> None:
    """``m``'s result = ``theta`` at every free position (the free mask is spent: it may be cleared)."""
    prev = _unwritten(m)
    assert m.result is not None
    if m.free is None or not fused_copy_where(m.free, m.result, theta, prev):
        _fill(m, prev)
        _copy_where(task, m.result, theta, m.free)


def _bool_scratch(task: TensorTask) -> Callable[[str], Tensor]:
    return lambda role: task.scratch(role, torch.bool)


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _copy_where(task: TensorTask, result: Tensor, theta: Tensor, mask: Tensor | None) -> None:
    """result[mask] = θ_k in place (everywhere when ``mask`` is None), bit for bit.

    Blended on the bits, r ^= (r ^ θ)·mask, which is three simple passes and several times
    faster than ``torch.where`` or boolean indexing on the CPU for 16-bit floats.
    """
    if mask is None:
        result.copy_(theta)
        return
    ints = _SAME_SIZE_INT.get(result.element_size())
    if ints is None or result.is_complex():
        torch.where(mask, theta, result, out=result)
        return
    bits = result.view(ints)
    flips = torch.bitwise_xor(bits, theta.view(ints), out=task.scratch("flips", ints))
    flips.mul_(mask.view(torch.uint8))
    bits.bitwise_xor_(flips)
