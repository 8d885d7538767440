"""Who this process is, and decisions taken once on rank 0 and shared with every rank.

Ranks come from ``torch.distributed``, not from ``TrainingArguments.process_index``: some CPU
launches report ``process_index == 0`` on every process, and a decision taken by several
"rank 0"s writes the same folder twice. Outside a process group the launcher's ``RANK``
environment variable is the fallback, so a stray process never believes it is the main one.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from obim_trainer.errors import OBIMError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RankFailure(OBIMError):
    """Work done on rank 0 for every rank failed; raised on every rank so none waits forever."""


def is_distributed() -> bool:
    """True inside an initialized ``torch.distributed`` process group with more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank: ``torch.distributed`` first, then the launcher's ``RANK``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T | None, src: int = 0) -> T:
    """``obj`` as rank ``src`` holds it, on every rank (each rank must call this, in the same order)."""
    import torch.distributed as dist

    if not is_distributed():
        return obj  # type: ignore[return-value]
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[return-value]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (collective; ``[obj]`` in a single process)."""
    import torch.distributed as dist

    if not is_distributed():
        return [obj]
    gathered: list[T | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered  # type: ignore[return-value]


def collective_device(group: Any = None) -> torch.device:
    """Gloo reduces CPU tensors; NCCL (and other accelerator backends) need them on the current device."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce(tensor: Tensor, op: str = "sum", group: Any = None) -> Tensor:
    """``tensor`` reduced (``sum`` or ``max``) over the ranks of ``group``, on the CPU (collective; itself alone).

    The one all-reduce of the project: evaluation sums and every kind of statistics
    (:mod:`~obim_trainer.calibration.reduction`) go through it.
    """
    import torch.distributed as dist

    if not is_distributed():
        return tensor
    reduced = tensor.to(collective_device(group))  # gloo reduces CPU tensors, NCCL device tensors
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return reduced.cpu()


def max_over_ranks(value: int) -> int:
    """The largest ``value`` over all ranks (collective; the value itself outside a process group)."""
    return int(all_reduce(torch.tensor([value], dtype=torch.int64), op="max").item())


def share_failure(error: BaseException | None, what: str) -> None:
    """Tell every rank whether rank 0 failed at ``what``; re-raise there, :class:`RankFailure` elsewhere.

    Collective: every rank calls it at the same point, with ``error`` set only on rank 0.
    """
    message = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if message is None:
        return
    if error is not None:
        raise error
    raise RankFailure(f"{what} failed on rank 0 ({message}); see rank 0's log")


def _describe(error: BaseException | None, what: str) -> str | None:
    """The message other ranks get for ``error``; an unexpected error's traceback is logged here."""
    if error is None:
        return None
    if is_distributed() and not isinstance(error, OBIMError):  # the other ranks only see the message
        logger.error("%s failed on rank %d:\n%s", what, rank(), "".join(traceback.format_exception(error)))
    return f"{type(error).__name__}: {error}"


def run_on_every_rank(fn: Callable[[], T], what: str) -> list[T]:
    """Run ``fn`` on every rank and give every rank all the results, in rank order.

    Collective: every rank calls it at the same point. A failure on any rank is raised on every
    rank (the failing one re-raises its own; the others raise :class:`RankFailure`), so no rank
    goes on with a partial result.
    """
    result: T | None = None
    error: Exception | None = None
    try:
        result = fn()
    except Exception as exc:
        error = exc
    outcomes = all_gather_object((result, _describe(error, what)))
    if error is not None:
        raise error
    for source, (_, message) in enumerate(outcomes):
        if message is not None:
            raise RankFailure(f"{what} failed on rank {source} ({message}); see rank {source}'s log")
    return [value for value, _ in outcomes]  # type: ignore[misc]


def run_on_main(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on rank 0 only and give its result to every rank.

    Every rank must call this at the same point. A failure on rank 0 is raised on every rank
    (see :func:`share_failure`) instead of leaving the other ranks waiting for a result that
    never comes.
    """
    result: T | None = None
    error: Exception | None = None
    if is_main_process():
        try:
            result = fn()
        except Exception as exc:
            error = exc
            _describe(exc, what)
    share_failure(error, what)
    return broadcast_object(result)
