"""Multi-process helpers: ranks from ``torch.distributed``, rank-0 decisions shared with every rank,
forward passes in step across ranks, and ZeRO-3 gathering one module at a time."""

from obim_trainer.distributed.lockstep import Batch, local_share, lockstep_batches
from obim_trainer.distributed.ranks import (
    RankFailure,
    all_gather_object,
    all_reduce,
    barrier,
    broadcast_object,
    is_distributed,
    is_main_process,
    max_over_ranks,
    rank,
    run_on_every_rank,
    run_on_main,
    share_failure,
    world_size,
)
from obim_trainer.distributed.zero import StateEntry, ZeroGatherer, is_partitioned, plain_model_loading

__all__ = [
    "Batch",
    "RankFailure",
    "StateEntry",
    "ZeroGatherer",
    "all_gather_object",
    "all_reduce",
    "barrier",
    "broadcast_object",
    "is_distributed",
    "is_main_process",
    "is_partitioned",
    "local_share",
    "lockstep_batches",
    "max_over_ranks",
    "plain_model_loading",
    "rank",
    "run_on_every_rank",
    "run_on_main",
    "share_failure",
    "world_size",
]
