"""The OBIM paper's Table 3 ablations, composed from existing parts.

* ``ties_obm``: TIES whose trimming ranks by OBM saliency (eq. 5) instead of magnitude
  (Table 3: 43.21 → 44.32).
* ``ties_im``: iterative merging (Algorithm 1) with magnitude as saliency (Table 3: 44.77).
"""

from __future__ import annotations

from torch import Tensor

from obim_trainer.merging.obim import OBIM
from obim_trainer.merging.registry import register_method
from obim_trainer.merging.saliency import SaliencyFn, magnitude_saliency, obm_saliency
from obim_trainer.merging.task import TensorTask
from obim_trainer.merging.ties import Ties


@register_method
class TiesOBM(Ties):
    name = "ties_obm"
    summary = "Ablation (OBIM Table 3): TIES with OBM saliency instead of magnitude for trimming."
    needs_activation_stats = True

    def trim_scores(self, task: TensorTask, k: int, delta: Tensor) -> Tensor:
        return obm_saliency(task, k, delta)


@register_method
class TiesIM(OBIM):
    name = "ties_im"
    summary = "Ablation (OBIM Table 3): iterative merging with magnitude |δ| as saliency."
    needs_activation_stats = False

    def saliency(self) -> SaliencyFn:
        return magnitude_saliency
