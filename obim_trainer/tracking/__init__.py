"""Where the callback's records go: Weights & Biases, or nowhere."""

from obim_trainer.tracking.logger import NullLogger, RunLogger, checkpoint_label
from obim_trainer.tracking.merge_summary import (
    LayerSummary,
    block_group,
    layer_type,
    sampled_blocks,
    summarize_report,
)
from obim_trainer.tracking.payload import Histogram, Image, Table
from obim_trainer.tracking.wandb_logger import WandbLogger, make_run_logger

__all__ = [
    "Histogram",
    "Image",
    "LayerSummary",
    "NullLogger",
    "RunLogger",
    "Table",
    "WandbLogger",
    "block_group",
    "checkpoint_label",
    "layer_type",
    "make_run_logger",
    "sampled_blocks",
    "summarize_report",
]
