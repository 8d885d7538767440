"""OBIM: Optimal Brain Iterative Merging (arXiv 2502.12217) = OBM saliency + iterative merging."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from obim_trainer.errors import ConfigError
from obim_trainer.merging.iterative import iterative_merge
from obim_trainer.merging.order import merge_order
from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.saliency import SaliencyFn, obm_saliency, token_frequency_saliency
from obim_trainer.merging.task import MergeOutput, TensorTask

RATIO_TOLERANCE = 1e-6


class OBIMParams(MethodParams):
    ratios: list[float] | None = Field(
        default=None, description="share n_k of each tensor per checkpoint (default 1/K; sum <= 1)"
    )
    order: Literal["rotation", "given", "priority"] = Field(
        default="rotation", description="rotation (by decoder block), given, or priority"
    )
    priority: list[float] | None = Field(default=None, description="with order=priority: higher goes first")
    embedding_saliency: Literal["random", "token_frequency"] = Field(
        default="random", description="saliency of embedding rows"
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

    def validate_for(self, num_models: int) -> None:
        p: OBIMParams = self.params  # type: ignore[assignment]
        if p.ratios is not None:
            if len(p.ratios) != num_models:
                raise ConfigError(
                    f"obim: ratios has {len(p.ratios)} value(s) {p.ratios} but there are {num_models} "
                    "checkpoints; give one n_k per checkpoint or omit ratios for 1/K each"
                )
            if any(not 0.0 <= r <= 1.0 for r in p.ratios):
                raise ConfigError(f"obim: every ratio must lie in [0, 1], got {p.ratios}")
            if sum(p.ratios) > 1.0 + RATIO_TOLERANCE:
                raise ConfigError(
                    f"obim: ratios {p.ratios} sum to {sum(p.ratios):.4g} > 1; each position can be owned by "
                    "one checkpoint only (paper, Algorithm 1 footnote): scale them down"
                )
        if p.order == "priority":
            merge_order(num_models, None, "priority", p.priority)
        elif p.priority is not None:
            raise ConfigError("obim: priority is only used with order 'priority'; set order: priority or drop it")

    @property
    def ratios(self) -> list[float]:
        p: OBIMParams = self.params  # type: ignore[assignment]
        return list(p.ratios) if p.ratios is not None else [1.0 / self.num_models] * self.num_models

    def order_for(self, block_index: int | None) -> list[int]:
        p: OBIMParams = self.params  # type: ignore[assignment]
        return merge_order(self.num_models, block_index, p.order, p.priority)

    def describe_tensor(self, block_index: int | None) -> str:
        return f"order {self.order_for(block_index)}"

    def saliency(self) -> SaliencyFn:
        """How positions are scored: OBM (eq. 5), with token frequency for embeddings on request."""
        p: OBIMParams = self.params  # type: ignore[assignment]
        return token_frequency_saliency if p.embedding_saliency == "token_frequency" else obm_saliency

    def merge(self, task: TensorTask) -> MergeOutput:
        return iterative_merge(task, self.ratios, self.order_for(task.block_index), self.saliency())
