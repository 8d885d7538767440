"""SLERP (mergekit's ``slerp``): spherical interpolation between the base and one checkpoint.

The whole tensor is one vector: θ_M = sin((1 − t)Ω)/sin Ω · θ_B + sin(tΩ)/sin Ω · θ_1 with Ω the angle
between them, and linear interpolation when they are (anti)collinear (|cos Ω| > 0.9995), where
the formula is 0/0, or when either is zero (no direction; mergekit takes a zero tensor as
orthogonal to everything there). t = 0 is the base, t = 1 the checkpoint. To interpolate two
checkpoints, pass one of them as the base.
"""

from __future__ import annotations

import torch
from pydantic import Field

from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.task import MergeOutput, TensorTask

DOT_THRESHOLD = 0.9995
EPS = 1e-8


class SlerpParams(MethodParams):
    t: float = Field(default=0.5, ge=0.0, le=1.0, description="interpolation factor: 0 = base, 1 = checkpoint")


@register_method
class Slerp(MergeMethod):
    name = "slerp"
    summary = "SLERP: spherical interpolation between the base (t = 0) and one checkpoint (t = 1)."
    Params = SlerpParams
    min_models = 1
    max_models = 1

    def merge(self, task: TensorTask) -> MergeOutput:
        t = self.params.t
        a, b = task.base.reshape(-1), task.checkpoint(0).reshape(-1)
        norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
        dot = torch.dot(a / norm_a, b / norm_b).clamp(-1, 1) if min(norm_a, norm_b) > EPS else None
        if dot is None or dot.abs() > DOT_THRESHOLD:
            merged = (1 - t) * a + t * b
        else:
            theta = torch.acos(dot)
            merged = (torch.sin((1 - t) * theta) / torch.sin(theta)) * a + (torch.sin(t * theta) / torch.sin(theta)) * b
        return MergeOutput(tensor=merged.reshape(task.base.shape))
