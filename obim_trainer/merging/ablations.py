"""The OBIM paper's Table 3 ablations, composed from the parts of TIES and OBIM, never copied.

* ``ties_obm``: TIES whose trimming ranks entries by OBM saliency (eq. 5) instead of magnitude,
  then TIES' sign election and disjoint mean (Table 3: TIES 43.21 → TIES+OBM 44.32). Needs
  activation statistics; non-Linear parameters get random saliency, as in OBIM.
* ``ties_im``: OBIM's iterative merging (Algorithm 1) with TIES' magnitude |δ| as saliency
  (Table 3: 44.77; OBIM 45.23). Same ratios and orders as ``obim``; no calibration needed.
"""

from __future__ import annotations

from pydantic import create_model
from torch import Tensor

from obim_trainer.merging.obim import OBIM, OBIMParams
from obim_trainer.merging.registry import MethodParams, register_method
from obim_trainer.merging.saliency import SaliencyFn, magnitude_saliency, obm_saliency, scores_tensor
from obim_trainer.merging.task import TensorTask
from obim_trainer.merging.ties import Ties

ITERATIVE_PARAMS = ("ratios", "order", "priority")

TiesIMParams = create_model(
    "TiesIMParams",
    __base__=MethodParams,
    __doc__="OBIM's iterative-merging parameters, without its saliency options.",
    **{name: (OBIMParams.model_fields[name].annotation, OBIMParams.model_fields[name]) for name in ITERATIVE_PARAMS},
)


@register_method
class TiesOBM(Ties):
    name = "ties_obm"
    summary = "Ablation (OBIM Table 3): TIES with OBM saliency instead of magnitude for trimming."
    needs_activation_stats = True

    def trim_scores(self, task: TensorTask, k: int, delta: Tensor) -> Tensor:
        return scores_tensor(obm_saliency(task, k, delta.clone))  # the saliency function may overwrite its input


@register_method
class TiesIM(OBIM):
    name = "ties_im"
    summary = "Ablation (OBIM Table 3): iterative merging with magnitude |δ| as saliency."
    Params = TiesIMParams
    needs_activation_stats = False

    def saliency(self) -> SaliencyFn:
        return magnitude_saliency
