"""Checkpoint I/O: read model folders tensor by tensor, write sharded safetensors atomically."""

from obim_trainer.checkpoints.atomic import atomic_output_dir, check_output_location, fsync_tree
from obim_trainer.checkpoints.dispatch import open_checkpoint
from obim_trainer.checkpoints.model_files import copy_model_files
from obim_trainer.checkpoints.reader import CheckpointReader, SafetensorsReader, TensorInfo, TorchBinReader
from obim_trainer.checkpoints.safetensors_writer import ShardedSafetensorsWriter, parse_size

__all__ = [
    "CheckpointReader",
    "SafetensorsReader",
    "ShardedSafetensorsWriter",
    "TensorInfo",
    "TorchBinReader",
    "atomic_output_dir",
    "check_output_location",
    "copy_model_files",
    "fsync_tree",
    "open_checkpoint",
    "parse_size",
]
