"""Saliency of each position of a task vector: which changes matter most to the layer's output.

OBM (Optimal Brain Merging, the paper's §3.1): for a linear layer with the layer-wise MSE
objective ‖ΔW X‖² (eq. 6) the Hessian is H = 2XXᵀ, so the saliency of δ_ij is
s_ij = ½·h_jj·δ_ij² = Σ_tokens x_j² · δ_ij² (eq. 5). Only the diagonal of H is needed, i.e.
the per-input-feature sum of squared activations. Scaling a tensor's scores does not change
the ranking inside it, so the mean over tokens is used. "For nonlinear layers, such as bias
layers, we apply random pruning": everything that is not a Linear weight gets seeded
uniform noise, identical on every device.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from obim_trainer.merging.task import ParamKind, TensorTask

SaliencyFn = Callable[[TensorTask, int, Tensor], Tensor]
"""``(task, k, delta_k) -> scores`` of the same shape, ≥ 0, higher is more salient.

``delta_k`` belongs to the saliency function, which may overwrite it to save memory."""


def random_saliency(task: TensorTask, k: int, delta: Tensor) -> Tensor:
    """Seeded uniform scores: random pruning for parameters without activation statistics."""
    return task.rand_like_base("saliency", k)


def obm_saliency(task: TensorTask, k: int, delta: Tensor) -> Tensor:
    """mean_j(x²)·δ_ij² for Linear weights (eq. 5 with H = 2XXᵀ); random for everything else."""
    if task.kind is not ParamKind.LINEAR:
        return random_saliency(task, k, delta)
    sq_mean = None if task.input_sq_mean is None else task.input_sq_mean[k]
    if sq_mean is None:
        raise ValueError(
            f"OBM saliency of Linear weight {task.name} needs activation statistics of checkpoint {k}; "
            "run the merge with calibration data"
        )
    return delta.square_().mul_(sq_mean)


def token_frequency_saliency(task: TensorTask, k: int, delta: Tensor) -> Tensor:
    """Embedding rows scored by how often their token occurs in the calibration data times δ².

    The input of an embedding is one-hot, so Σ x_j² over tokens is the token's count: the
    exact analogue of eq. 5. Other tensors fall back to :func:`obm_saliency`.
    """
    if task.kind is ParamKind.EMBEDDING and task.token_counts is not None:
        return delta.square_().mul_(task.token_counts)
    return obm_saliency(task, k, delta)


def magnitude_saliency(task: TensorTask, k: int, delta: Tensor) -> Tensor:
    """|δ|: TIES' trimming criterion, used by the ``ties_im`` ablation (Table 3)."""
    return delta.abs_()
