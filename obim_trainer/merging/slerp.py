"""SLERP between the base and one checkpoint (mergekit's ``slerp``): spherical interpolation of the
whole tensor, linear when the two are (anti)collinear. t = 0 is the base, t = 1 the checkpoint."""

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
    summary = "Spherical interpolation between the base and one checkpoint."
    Params = SlerpParams
    min_models = 1
    max_models = 1

    def merge(self, task: TensorTask) -> MergeOutput:
        t = self.params.t
        a, b = task.base.reshape(-1), task.checkpoint(0).reshape(-1)
        norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
        norm_a = norm_a if norm_a > EPS else torch.ones_like(norm_a)
        norm_b = norm_b if norm_b > EPS else torch.ones_like(norm_b)
        dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
        if dot.abs() > DOT_THRESHOLD:
            merged = (1 - t) * a + t * b
        else:
            theta = torch.acos(dot)
            merged = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
        return MergeOutput(tensor=merged.reshape(task.base.shape))
