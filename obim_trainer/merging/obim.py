"""OBIM: Optimal Brain Iterative Merging (arXiv 2502.12217) = OBM saliency + iterative merging.

Each checkpoint scores its own task vector by OBM saliency, s_ij ∝ mean_j(x²)·δ_ij² (eq. 5
with the layer-wise Hessian H = 2XXᵀ of eq. 6), and the checkpoints then claim disjoint sets
of positions one after another, each taking its n_k share of the most salient positions still
free (Algorithm 1, eq. 8). The default n_k = 1/K makes every position come from exactly one
checkpoint; the order rotates by one per decoder block (O^{l+1} = LR(O^l, 1)). This module only
holds the parameters and their validation; the math lives in :mod:`~obim_trainer.merging.saliency`,
:mod:`~obim_trainer.merging.order` and :mod:`~obim_trainer.merging.iterative`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

from pydantic import Field

from obim_trainer.errors import ConfigError
from obim_trainer.merging.iterative import iterative_merge, iterative_merge_many
from obim_trainer.merging.order import OrderMode, merge_order
from obim_trainer.merging.registry import MergeMethod, MethodParams, StatisticsNeeds, register_method
from obim_trainer.merging.saliency import (
    SaliencyFn,
    forgetting_aware_saliency,
    obm_saliency,
    token_frequency_saliency,
)
from obim_trainer.merging.task import MergeOutput, TensorTask
from obim_trainer.merging.topk import RATIO_TOLERANCE


class OBIMParams(MethodParams):
    ratios: list[float] | None = Field(
        default=None, description="share n_k of each tensor per checkpoint, in the given order (default 1/K; sum <= 1)"
    )
    order: OrderMode = Field(default="rotation", description="rotation (by decoder block), given, or priority")
    priority: list[float] | None = Field(default=None, description="with order=priority: higher goes first")
    embedding_saliency: Literal["random", "token_frequency"] = Field(
        default="random", description="saliency of embedding rows: random (the paper) or token frequency"
    )
    saliency: Literal["obm", "forgetting_aware"] = Field(
        default="obm",
        description="obm (the paper, eq. 5, activation statistics) or forgetting_aware: δ²·F_new/(F_old+ε)^γ "
        "(Fisher diagonals, base on old-language text, checkpoints on new-language text)",
    )
    gamma: float = Field(
        default=1.0, ge=0.0, description="forgetting_aware: exponent γ >= 0 of the old-language Fisher in the score"
    )


@register_method
class OBIM(MergeMethod):
    name = "obim"
    summary = (
        "Optimal Brain Iterative Merging: activation-weighted saliency (eq. 5) and mutually exclusive "
        "iterative selection (Algorithm 1); the paper's best at recovering a base after continued pre-training."
    )
    Params = OBIMParams
    needs_activation_stats = True

    @property
    def _params(self) -> OBIMParams:
        return self.params  # type: ignore[return-value]

    @property
    def forgetting_aware(self) -> bool:
        """Whether positions are scored by the forgetting-aware saliency (Fisher statistics) instead of OBM."""
        return getattr(self.params, "saliency", "obm") == "forgetting_aware"

    def statistics(self) -> StatisticsNeeds:
        if self.forgetting_aware:
            return StatisticsNeeds(fishers=True, per_language=True)
        return super().statistics()

    def validate_for(self, num_models: int) -> None:
        if self.forgetting_aware and self._params.embedding_saliency != "random":
            raise ConfigError(
                f"{self.name}: embedding_saliency={self._params.embedding_saliency} applies to the OBM saliency; "
                "saliency=forgetting_aware scores embedding rows by their Fishers already; drop one of them"
            )
        ratios = self._params.ratios
        if ratios is not None:
            if len(ratios) != num_models:
                raise ConfigError(
                    f"{self.name}: ratios has {len(ratios)} value(s) {ratios} but there are {num_models} "
                    "checkpoints; give one n_k per checkpoint or omit ratios for 1/K each"
                )
            if not all(0.0 <= r <= 1.0 for r in ratios):
                raise ConfigError(
                    f"{self.name}: every ratio must lie in [0, 1], got {ratios}; n_k is a share of each tensor"
                )
            if math.fsum(ratios) > 1.0 + RATIO_TOLERANCE:
                raise ConfigError(
                    f"{self.name}: ratios {ratios} sum to {math.fsum(ratios):.4g} > 1, but each position can be "
                    "owned by one checkpoint only (the paper's footnote: Σ n_k ≤ 1); scale them down"
                )
        merge_order(num_models, None, self._params.order, self._params.priority)

    @property
    def ratios(self) -> list[float]:
        """n_k per checkpoint (by checkpoint index): the given ratios, or 1/K each."""
        given = self._params.ratios
        return list(given) if given is not None else [1.0 / self.num_models] * self.num_models

    def order_for(self, block_index: int | None) -> list[int]:
        return merge_order(self.num_models, block_index, self._params.order, self._params.priority)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if not self.forgetting_aware:
            described.pop("gamma", None)  # only the forgetting-aware score reads it
        return described

    def describe_tensor(self, block_index: int | None) -> str:
        return f"order {self.order_for(block_index)}"

    def saliency(self) -> SaliencyFn:
        """How positions are scored: OBM (eq. 5; token frequency for embeddings on request) or forgetting-aware."""
        if self.forgetting_aware:
            return forgetting_aware_saliency(self._params.gamma)
        return token_frequency_saliency if self._params.embedding_saliency == "token_frequency" else obm_saliency

    def merge(self, task: TensorTask) -> MergeOutput:
        return iterative_merge(task, self.ratios, self.order_for(task.block_index), self.saliency())

    def joint_key(self, block_index: int | None) -> Hashable:
        """Merges by this method that differ only in their shares select from the same scores in the same order."""
        others = json.dumps(self.params.model_dump(mode="json", exclude={"ratios"}), sort_keys=True)
        return self.name, self.num_models, tuple(self.order_for(block_index)), others

    def merge_together(self, task: TensorTask, methods: Sequence[MergeMethod]) -> list[MergeOutput]:
        ratios = [method.ratios for method in methods if isinstance(method, OBIM)]
        assert len(ratios) == len(methods), "merged together only with OBIM merges (same joint_key)"
        return iterative_merge_many(task, ratios, self.order_for(task.block_index), self.saliency())
