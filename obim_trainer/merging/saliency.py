"""Saliency of each position of a task vector: how much removing that change would hurt the layer.

OBM (Optimal Brain Merging, the paper's §3.1) scores δ_i by the loss increase of setting it to
zero, s_i = ½·h_ii·δ_i² (eq. 5). For a linear layer with the layer-wise MSE objective ‖ΔW X‖²
(eq. 6) the Hessian is H = 2XXᵀ, whose diagonal entry for weight (i, j) is 2·Σ_tokens x_j²: so
s_ij = Σ_tokens x_j²·δ_ij², and only the per-input-feature sum of squared activations is needed
(forward passes, no labels). Scaling a tensor's scores does not change the ranking inside it,
so the mean over tokens is used. "For nonlinear layers, such as bias layers, we apply random
pruning": everything that is not a Linear weight gets seeded uniform scores, identical on every
device. MoE routers and experts are linear maps (an expert over the tokens routed to it) and are
scored like Linear weights. Embeddings can instead be scored by token frequency, the exact analogue of eq. 5 for a
one-hot input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from obim_trainer.merging.random_scores import RandomScores
from obim_trainer.merging.task import ParamKind, TensorTask, derive_seed
from obim_trainer.settings.names import PER_LANGUAGE_CALIBRATION, settings_example


@dataclass(frozen=True)
class ScaledSquare:
    """Scores δ²·scale (eq. 5), described rather than computed.

    Iterative merging's fused loops compute them on the fly from θ_k and θ_B while they select
    (:mod:`~obim_trainer.merging.fused_take`), which saves writing and reading a float32 tensor;
    :meth:`materialize` computes them with torch for everything else.
    """

    vector: TaskVector
    scale: Tensor

    def materialize(self) -> Tensor:
        """The scores in float32, in the task's ``scores`` scratch buffer."""
        return self.vector().square_().mul_(self.scale)


Scores = Tensor | ScaledSquare | RandomScores


@dataclass(frozen=True)
class TaskVector:
    """δ_k = θ_k − θ_B of one tensor, not computed until asked (random saliency never asks).

    Calling it computes δ_k in float32 into the task's ``scores`` scratch buffer, which the
    saliency function owns and may overwrite; :meth:`scaled_square` describes δ²·scale instead.
    """

    task: TensorTask
    theta: Tensor
    """θ_k as stored (any float dtype) on the task's device."""

    def __call__(self) -> Tensor:
        # converting first and subtracting in float32 is twice as fast as a mixed-dtype subtraction
        return self.task.scratch("scores").copy_(self.theta).sub_(self.task.base)

    def scaled_square(self, scale: Tensor) -> ScaledSquare:
        return ScaledSquare(self, scale)


SaliencyFn = Callable[[TensorTask, int, Callable[[], Tensor]], Scores]
"""``(task, k, delta) -> scores`` shaped like the tensor, ≥ 0, higher is more salient.

``delta()`` computes δ_k in float32, a tensor the saliency function owns and may overwrite to save
memory. It is a function because random scores never look at δ_k: the embedding, norms and biases
then skip the two passes that computing it costs. When ``delta`` is a :class:`TaskVector`, scores of
the form δ²·scale are returned as a :class:`ScaledSquare`; :func:`scores_tensor` turns either into a
tensor."""


def scores_tensor(scores: Scores) -> Tensor:
    """The scores as a float32 tensor."""
    return scores if isinstance(scores, Tensor) else scores.materialize()


def _scaled_square(delta: Callable[[], Tensor], scale: Tensor) -> Scores:
    if isinstance(delta, TaskVector):
        return delta.scaled_square(scale)
    return delta().square_().mul_(scale)


def _check_broadcast(task: TensorTask, what: str, factor: Tensor) -> None:
    """A clear error instead of a broadcasting failure deep inside torch.

    Checked by hand: the first ``torch.broadcast_shapes`` of a process imports ``torch._refs`` (0.4 s).
    """
    shape = task.shape
    extra = len(factor.shape) - len(shape)
    fits = extra <= 0 and all(f in (1, n) for f, n in zip(reversed(factor.shape), reversed(shape), strict=False))
    if not fits:
        raise ValueError(
            f"{what} for {task.name} has shape {tuple(factor.shape)}, which does not broadcast to the "
            f"tensor's shape {tuple(shape)}; the statistics belong to another model: recompute them"
        )


def random_saliency(task: TensorTask, k: int, delta: Callable[[], Tensor]) -> Scores:
    """Seeded uniform scores: the paper's random pruning for parameters without a Hessian estimate.

    A hash of each position under a seed derived from the task's seed, name and ``k``
    (:mod:`~obim_trainer.merging.random_scores`): the same on every device. Given a
    :class:`TaskVector` (iterative merging), they are returned undrawn, for the fused loops.
    """
    scores = RandomScores(derive_seed(task.seed, task.name, "saliency", k), task.shape, task.device)
    return scores if isinstance(delta, TaskVector) else scores.materialize(task.scratch("scores"))


def obm_saliency(task: TensorTask, k: int, delta: Callable[[], Tensor]) -> Scores:
    """mean_j(x²)·δ_ij² for Linear weights (eq. 5 with H = 2XXᵀ from eq. 6); random for everything else.

    A linear map no calibration token reached in checkpoint ``k`` (an MoE expert the router never chose:
    its statistics are all zero) has no Hessian estimate either, and is scored at random too; zero scores
    would hand its positions out by index.

    Raises:
        ValueError: a Linear weight without activation statistics for checkpoint ``k``, or with
            statistics of the wrong shape.
    """
    if task.kind is not ParamKind.LINEAR:
        return random_saliency(task, k, delta)
    sq_mean = None if task.input_sq_mean is None else task.input_sq_mean[k]
    if sq_mean is None:
        raise ValueError(
            f"OBM saliency of Linear weight {task.name} needs activation statistics of checkpoint {k}; "
            "run the merge with calibration data"
        )
    _check_broadcast(task, f"activation statistics of checkpoint {k}", sq_mean)
    if not bool(sq_mean.any()):
        return random_saliency(task, k, delta)
    return _scaled_square(delta, sq_mean)


def token_frequency_saliency(task: TensorTask, k: int, delta: Callable[[], Tensor]) -> Scores:
    """Embedding rows scored by their token's count in the calibration data times δ².

    An embedding's input is one-hot, so Σ_tokens x_j² for row j is the token's count: eq. 5
    with the embedding's exact Hessian diagonal. Embeddings without counts and every other
    tensor fall back to :func:`obm_saliency`.
    """
    if task.kind is not ParamKind.EMBEDDING or task.token_counts is None:
        return obm_saliency(task, k, delta)
    _check_broadcast(task, "token counts", task.token_counts)
    return _scaled_square(delta, task.token_counts)


def magnitude_saliency(task: TensorTask, k: int, delta: Callable[[], Tensor]) -> Tensor:
    """|δ|: TIES' trimming criterion, used by the ``ties_im`` ablation (the paper's Table 3)."""
    return delta().abs_()


FORGETTING_EPS_SHARE = 1e-3
"""ε = this × mean(F_old) over the tensor in the forgetting-aware score."""


def forgetting_aware_saliency(gamma: float) -> SaliencyFn:
    """Scores δ_k²·F_new(θ_k)/(F_old(θ_B) + ε)^γ for every parameter, ε = 1e-3·mean(F_old) over the tensor.

    Under a diagonal quadratic model of each language's loss around its own model, keeping δ_i in the
    merge costs ½·F_old,i·δ_i² of old-language loss (the base's curvature on old-language text) and
    resetting it to θ_B costs ½·F_new,i·δ_i² of new-language loss (checkpoint k's curvature on new-language
    text). OBM's eq. 5 weighs only the second; dividing by (F_old + ε)^γ ranks first the changes that help
    the new language most per unit of old-language damage. γ = 0 is OBM's rule with the Fisher as the
    Hessian diagonal; ε keeps parameters the old language never uses from dividing by zero. Every kind of
    parameter has Fishers, so nothing falls back to random scores. The scores are a float32 tensor, read
    by the same exact selection as OBM's.

    Raises:
        ValueError: the task lacks the Fisher diagonals or they have another shape.
    """

    def score(task: TensorTask, k: int, delta: Callable[[], Tensor]) -> Tensor:
        f_old, f_new = _fisher_pair(task, k)
        eps = max(FORGETTING_EPS_SHARE * float(f_old.mean()), torch.finfo(torch.float32).tiny)
        scores = delta().square_().mul_(f_new)
        if gamma != 0.0:
            scores.div_(f_old.add(eps).pow_(gamma))
        return scores.clamp_(max=torch.finfo(torch.float32).max)  # finite: a huge score still ranks first

    return score


def _fisher_pair(task: TensorTask, k: int) -> tuple[Tensor, Tensor]:
    """(F_old, F_new,k) of the task as float32 on its device, or a clear error."""
    fishers = task.checkpoint_fishers
    if task.base_fisher is None or fishers is None or len(fishers) != task.num_models:
        raise ValueError(
            f"forgetting-aware saliency of {task.name} needs the base's Fisher and checkpoint {k}'s; run the merge "
            f"with per-language calibration data ({settings_example(PER_LANGUAGE_CALIBRATION)})"
        )
    pair = task.base_fisher.to(task.device, torch.float32), fishers[k].to(task.device, torch.float32)
    if any(f.shape != task.shape for f in pair):
        raise ValueError(
            f"Fisher diagonals for {task.name} have shapes {[tuple(f.shape) for f in pair]}, not the tensor's "
            f"{tuple(task.shape)}: the statistics belong to another model; recompute them"
        )
    return pair
