"""WIDEN (Yu et al., ICLR 2025, "Extend model merging from fine-tuned to pre-trained LLMs via
weight disentanglement").

A weight is disentangled into magnitude m (the norm of each input column over the output
dimension) and direction D = W / m. Each checkpoint's divergence from the base, Δm = |m_n − m_pre|
and ΔD = 1 − cos(D_n, D_pre) per column, is ranked inside that checkpoint (ascending; score =
position / columns, eq. 3) and turned into importance by a softmax over the checkpoints (eq. 4).
Where a checkpoint's ranked score exceeds t × its mean score, the softmax score is replaced by
s (eqs. 5–6). W_M = W_pre + Σ_n ½(M_n + D_n) ⊙ (W_n − W_pre) (eq. 7). One-dimensional
parameters use magnitudes only, |θ_n − θ_pre| per entry. t < 0 with s = 1/N is averaging;
s = λ is task arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.task import MergeOutput, TensorTask

EPS = 1e-8


def ranked_scores(divergence: Tensor) -> Tensor:
    """Rank of each column inside its checkpoint, ascending, as position / columns in [0, 1) (eq. 3)."""
    columns = divergence.shape[1]
    ranks = divergence.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    return ranks.to(torch.float32) / columns


def importance(divergence: Tensor, t: float, s: float) -> Tensor:
    """Softmax over checkpoints of the ranked scores (eq. 4), calibrated to s where a score exceeds
    t × that checkpoint's mean score (eqs. 5–6). ``divergence`` is [N, columns]."""
    scores = ranked_scores(divergence)
    weights = F.softmax(scores, dim=0)
    calibrate = scores > t * scores.mean(dim=1, keepdim=True)
    return torch.where(calibrate, torch.full_like(weights, s), weights)


class WidenParams(MethodParams):
    t: float = Field(default=1.0, description="calibration threshold (paper grid: 1.0, 2.0)")
    s: float = Field(default=1.0, description="calibrated score (paper: 1.0)")


@register_method
class Widen(MergeMethod):
    name = "widen"
    summary = "WIDEN: magnitude/direction disentanglement, in-model ranking, calibrated softmax importance."
    Params = WidenParams

    def merge(self, task: TensorTask) -> MergeOutput:
        base = task.base
        checkpoints = [task.checkpoint(k) for k in range(task.num_models)]
        deltas = torch.stack([c - base for c in checkpoints])
        t, s = self.params.t, self.params.s
        if base.dim() < 2:
            weight = importance(deltas.abs().reshape(len(checkpoints), -1), t, s).view_as(deltas)
            return MergeOutput(tensor=base + (weight * deltas).sum(dim=0))
        rows = base.reshape(base.shape[0], -1)
        m_pre = torch.linalg.vector_norm(rows, dim=0)
        d_pre = rows / m_pre.clamp_min(EPS)
        mag_div, dir_div = [], []
        for c in checkpoints:
            c_rows = c.reshape(rows.shape)
            m_n = torch.linalg.vector_norm(c_rows, dim=0)
            d_n = c_rows / m_n.clamp_min(EPS)
            mag_div.append((m_n - m_pre).abs())
            # zero columns have no direction: cos is taken as 1 (no divergence), never NaN
            cos = (d_n * d_pre).sum(dim=0)
            both = (m_n > EPS) & (m_pre > EPS)
            dir_div.append(torch.where(both, 1 - cos, torch.zeros_like(cos)))
        weight = 0.5 * (importance(torch.stack(mag_div), t, s) + importance(torch.stack(dir_div), t, s))
        merged = rows + (weight.unsqueeze(1) * deltas.reshape(len(checkpoints), *rows.shape)).sum(dim=0)
        return MergeOutput(tensor=merged.reshape(base.shape))
