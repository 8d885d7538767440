"""``open_checkpoint``: one entry point for every checkpoint format a continued-pretraining run leaves.

The format is decided by :func:`~obim_trainer.checkpoints.detect.detect_format` from the files alone,
and this module only maps it to its reader. It lives apart from :mod:`.reader` because the DeepSpeed
and LoRA readers build on the plain readers defined there.
"""

from __future__ import annotations

from pathlib import Path

from obim_trainer.checkpoints import detect
from obim_trainer.checkpoints.reader import CheckpointReader, SafetensorsReader, TorchBinReader
from obim_trainer.errors import CheckpointError
from obim_trainer.settings.names import setting_name


def open_checkpoint(
    path: str | Path, *, zero_weights: str = detect.ZERO_AUTO, base: CheckpointReader | None = None
) -> CheckpointReader:
    """Open a checkpoint folder in whichever supported format it holds.

    Args:
        path: A ``save_pretrained`` folder (safetensors or ``.bin``, sharded or not), a Trainer
            ``checkpoint-N`` written under DeepSpeed ZeRO, or a PEFT LoRA adapter folder.
        zero_weights: For a DeepSpeed checkpoint: ``auto`` (the saved weights if present, else the
            fp32 masters), ``saved`` or ``master``; see :mod:`.detect`.
        base: The opened base model. Needed for a LoRA adapter, which stores only the change to it
            (the returned reader yields base + B·A·scaling and borrows ``base``, leaving it open).

    Raises :class:`CheckpointError` naming the folder and what to do when it is missing, matches no
    format (listing what it holds), or its files are corrupt or inconsistent.
    """
    path = Path(path)
    fmt = detect.detect_format(path, zero_weights)
    if fmt == detect.PEFT_LORA:
        return _open_adapter(path, base)
    if fmt == detect.ZERO:
        from obim_trainer.checkpoints.zero_reader import ZeroCheckpointReader

        return ZeroCheckpointReader(path)
    reader = _open_hf(path, fmt)
    reader.format = fmt
    return reader


def _open_hf(path: Path, fmt: str) -> CheckpointReader:
    if fmt == detect.SAFETENSORS:
        return SafetensorsReader(path, [path / detect.SAFETENSORS_SINGLE])
    if fmt == detect.SAFETENSORS_SHARDED:
        return SafetensorsReader.from_index(path, path / detect.SAFETENSORS_INDEX)
    if fmt == detect.SAFETENSORS_OTHER:
        return SafetensorsReader(path, detect.other_safetensors(path))
    if fmt == detect.BIN:
        return TorchBinReader(path, [path / detect.BIN_SINGLE])
    return TorchBinReader.from_index(path, path / detect.BIN_INDEX)


def _open_adapter(path: Path, base: CheckpointReader | None) -> CheckpointReader:
    if base is None:
        raise CheckpointError(
            f"{path} is a PEFT LoRA adapter, which holds only the change to its base model, not a model; it can be "
            f"merged as a checkpoint of its base (set {setting_name('base', 'DIR')} to the base model the adapter was "
            "trained on), but it cannot be the base itself"
        )
    from obim_trainer.checkpoints.lora_reader import LoraCheckpointReader

    return LoraCheckpointReader(path, base)
