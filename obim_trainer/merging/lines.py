"""LiNeS: layer-increasing network scaling (Wang et al. 2025, "LiNeS: Post-training Layer Scaling Prevents
Forgetting and Enhances Model Merging", ICLR 2025).

Shallow layers hold general features and deep layers task-specific ones, so forgetting is reduced by
scaling the update of each layer linearly with its depth (their eq. 1–2):
    θ = θ_B + λ(ℓ)·τ,   λ(ℓ) = α + β·(ℓ − 1)/(L − 1)  for layer ℓ = 1..L,
with τ the merged task vector, here mean_k δ_k. With 0-based decoder block indices ℓ that is
α + β·ℓ/(L − 1). Parameters outside the decoder blocks sit at the ends of the network: the
embeddings (before block 0) get α and everything else (final norm, LM head, after the last block)
α + β. A single-block model counts its block as the first (α).

Defaults α = 0, β = 1: the paper's single-task editing of a fine-tuned residual (§3), the first layer
kept at the base and the update growing to the full τ at the last; the paper tunes β (and sets α to the
merging method's own scale in the multi-task case), so sweep them (``--param alpha=0.2,0.6``).
"""

from __future__ import annotations

from pydantic import Field

from obim_trainer.merging.least_squares import mean_delta
from obim_trainer.merging.registry import MergeMethod, MethodParams, register_method
from obim_trainer.merging.task import MergeOutput, ParamKind, TensorTask


class LiNeSParams(MethodParams):
    alpha: float = Field(default=0.0, description="scale α of the first block's (and the embeddings') update")
    beta: float = Field(default=1.0, description="increase β of the scale from the first block to the last (α + β)")


@register_method
class LiNeS(MergeMethod):
    name = "lines"
    summary = (
        "LiNeS (Wang et al. 2025): θ_B + λ(ℓ)·mean_k δ_k with λ growing linearly with depth, α at the first "
        "decoder block and the embeddings, α + β at the last block, the final norm and the LM head."
    )
    Params = LiNeSParams

    def scale(self, task: TensorTask) -> float:
        """λ(ℓ) of the tensor's place in the network (eq. 2)."""
        alpha, beta = self.params.alpha, self.params.beta  # type: ignore[attr-defined]
        if task.block_index is None:
            return alpha if task.kind is ParamKind.EMBEDDING else alpha + beta
        blocks = task.num_blocks
        if blocks is None or not 0 <= task.block_index < blocks:
            raise ValueError(
                f"LiNeS scales {task.name} (decoder block {task.block_index}) by its depth but the model's number "
                f"of decoder blocks is {blocks}; the engine must give num_blocks"
            )
        return alpha + beta * task.block_index / max(blocks - 1, 1)

    def describe_tensor(self, block_index: int | None) -> str:
        return "λ(ℓ) = α + β·ℓ/(L−1)" if block_index is not None else "α (embeddings) or α + β (after the blocks)"

    def merge(self, task: TensorTask) -> MergeOutput:
        return MergeOutput(tensor=mean_delta(task).mul_(self.scale(task)).add_(task.base))
