"""WIDEN (Yu et al., ICLR 2025, "Extend model merging from fine-tuned to pre-trained LLMs via weight
disentanglement"): merge by how much each checkpoint changed each weight column, not by how large
its task vector is, so that a continued-pretraining checkpoint with large deltas does not drown a
fine-tuned one.

A weight is disentangled into magnitudes m (the norm of each input column over the output
dimension) and directions D = W / m. Each checkpoint's divergence from the base, Δm = |m_n − m_pre|
and ΔD = 1 − cos(D_n, D_pre) per column, is ranked inside that checkpoint (ascending, score =
position / columns, eq. 3) and turned into importance by a softmax over the checkpoints (eq. 4).
Where a checkpoint's score exceeds t × its mean score, the importance is replaced by s
(score calibration, eqs. 5–6). W_M = W_pre + Σ_n ½(M_n + D_n) ⊙ (W_n − W_pre) (eq. 7).

As in the authors' code: embedding matrices are transposed first (one column per token), and
parameters with fewer than two dimensions (norms, biases) have no direction: their importance is
the calibrated softmax of the raw |θ_n − θ_pre| per entry. t < 0 with s = 1/N is averaging;
t < 0 with s = λ is task arithmetic.

Zero columns have no direction: a column that is zero in both the base and a checkpoint has not
changed (ΔD = 0); one that is zero in only one of them has turned completely (ΔD = 1). Never NaN.
Other 2-D weights are read as ``nn.Linear`` ``[out, in]``, so a ``Conv1D`` weight (``[in, out]``,
GPT-2) is ranked by output rows instead of input columns.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.task import MergeOutput, ParamKind, TensorTask


def ranked_scores(divergence: Tensor) -> Tensor:
    """Rank of each column inside its checkpoint, ascending, as position / columns in [0, 1) (eq. 3).

    ``divergence`` is [N, columns]; equal values rank by column index (a stable sort).
    """
    columns = divergence.shape[1]
    order = divergence.argsort(dim=1, stable=True)
    positions = torch.arange(columns, device=divergence.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions).to(torch.float32).div_(columns)


def importance(significance: Tensor, t: float, s: float) -> Tensor:
    """Softmax over checkpoints (eq. 4), set to ``s`` where a checkpoint's significance exceeds
    ``t`` × its mean over the columns (eqs. 5–6). ``significance`` is [N, columns]."""
    weights = torch.softmax(significance, dim=0)
    calibrate = significance > t * significance.mean(dim=1, keepdim=True)
    return weights.masked_fill_(calibrate, s)


def columns(tensor: Tensor, kind: ParamKind) -> Tensor:
    """A view of a ≥2-D weight as [columns, entries]: input columns of a Linear weight, rows of an embedding."""
    rows = tensor.reshape(tensor.shape[0], -1)
    return rows if kind is ParamKind.EMBEDDING else rows.T


def direction_divergence(cols: Tensor, base_cols: Tensor, norms: Tensor, base_norms: Tensor) -> Tensor:
    """1 − cos between each column and the base's, with zero columns handled (see the module doc)."""
    product = norms * base_norms
    cos = torch.linalg.vecdot(cols, base_cols, dim=1).div_(product.clamp_min(torch.finfo().tiny)).clamp_(-1, 1)
    both_zero = (norms == 0) & (base_norms == 0)
    return cos.masked_fill_(both_zero, 1.0).neg_().add_(1.0)


class WidenParams(MethodParams):
    t: float = Field(default=1.0, description="calibration threshold: × the mean score (paper grid: 1.0, 2.0)")
    s: float = Field(default=1.0, description="importance given to calibrated entries (paper: 1.0)")


@register_method
class Widen(MergeMethod):
    name = "widen"
    summary = (
        "WIDEN (Yu et al. 2025): magnitude/direction disentanglement, in-model ranking, calibrated softmax "
        "importance; built for merging continued-pretraining and fine-tuned checkpoints."
    )
    Params = WidenParams

    def merge(self, task: TensorTask) -> MergeOutput:
        if task.base.dim() < 2:
            return MergeOutput(tensor=self._merge_entries(task))
        return MergeOutput(tensor=self._merge_columns(task))

    def _merge_entries(self, task: TensorTask) -> Tensor:
        deltas = torch.stack([task.delta(k).reshape(-1) for k in range(task.num_models)])
        weight = importance(deltas.abs(), self.params.t, self.params.s)
        return deltas.mul_(weight).sum(dim=0).view(task.base.shape).add_(task.base)

    def _merge_columns(self, task: TensorTask) -> Tensor:
        n = task.num_models
        base_cols = columns(task.base, task.kind)
        base_norms = torch.linalg.vector_norm(base_cols, dim=1)
        deltas = torch.empty((n, *task.base.shape), dtype=torch.float32, device=task.device)
        magnitude_div = torch.empty((n, base_cols.shape[0]), dtype=torch.float32, device=task.device)
        direction_div = torch.empty_like(magnitude_div)
        for k in range(n):
            theta = task.checkpoint(k)
            cols = columns(theta, task.kind)
            norms = torch.linalg.vector_norm(cols, dim=1)
            magnitude_div[k] = (norms - base_norms).abs_()
            direction_div[k] = direction_divergence(cols, base_cols, norms, base_norms)
            deltas[k] = theta.sub_(task.base)
        t, s = self.params.t, self.params.s
        weight = importance(ranked_scores(magnitude_div), t, s).add_(importance(ranked_scores(direction_div), t, s))
        weight.mul_(0.5)
        merged = task.base.clone()
        merged_cols = columns(merged, task.kind)
        for k in range(n):
            merged_cols.add_(columns(deltas[k], task.kind) * weight[k].unsqueeze(1))
        return merged
