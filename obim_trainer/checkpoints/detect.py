"""Which checkpoint format a folder holds.

A continued-pretraining run leaves more than plain Hugging Face folders: DeepSpeed writes its
sharded fp32 master weights beside (or, under ZeRO-3, instead of) ``model.safetensors``, and a PEFT
run saves only an adapter. Every reader is chosen here, by files alone, so that a folder nobody
recognises fails once, with a list of what it holds.

When a folder holds several formats:

* a PEFT adapter wins: a Trainer saves ``adapter_model.safetensors`` for a PEFT model even under
  DeepSpeed, and its ``global_step*/`` then holds the adapter wrapped in PEFT's module names;
* for a DeepSpeed checkpoint that also holds the weights the Trainer saved (``model.safetensors``,
  the 16-bit rounding of the fp32 master weights), ``zero_weights`` decides. The default, ``"auto"``,
  reads the saved weights when they are there and the fp32 masters otherwise (ZeRO-3 without
  ``stage3_gather_16bit_weights_on_model_save``): the saved weights are the model the Trainer
  evaluated — the numbers the checkpoints were selected by — and what ``from_pretrained`` loads,
  and reading them needs neither DeepSpeed nor unpickling. ``"master"`` reads the fp32 masters
  (the exact values the optimizer held), ``"saved"`` insists on the saved file;
* among Hugging Face files, the first of ``model.safetensors``, its index, ``pytorch_model.bin``, its
  index wins, as in transformers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from obim_trainer.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ZERO_LATEST = "latest"

# Format names returned by detect_format; open_checkpoint dispatches on them.
SAFETENSORS = "safetensors"
SAFETENSORS_SHARDED = "safetensors-sharded"
BIN = "bin"
BIN_SHARDED = "bin-sharded"
SAFETENSORS_OTHER = "safetensors-other"
ZERO = "deepspeed-zero"
PEFT_LORA = "peft-lora"

HF_FILES = {
    SAFETENSORS_SINGLE: SAFETENSORS,
    SAFETENSORS_INDEX: SAFETENSORS_SHARDED,
    BIN_SINGLE: BIN,
    BIN_INDEX: BIN_SHARDED,
}
ZERO_AUTO, ZERO_MASTER, ZERO_SAVED = "auto", "master", "saved"
ZERO_WEIGHTS = (ZERO_AUTO, ZERO_SAVED, ZERO_MASTER)
SUPPORTED = (
    f"{SAFETENSORS_SINGLE}; {SAFETENSORS_INDEX} with its shards; one other *.safetensors file; {BIN_SINGLE}; "
    f"{BIN_INDEX} with its shards; a DeepSpeed ZeRO checkpoint ({ZERO_LATEST} and global_step*/ with "
    f"*_model_states.pt and *_optim_states.pt); a PEFT LoRA adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS[0]})"
)
_LISTED = 12


def adapter_weights(path: Path) -> Path | None:
    """The adapter weight file of a PEFT folder, if it has one."""
    return next((path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()), None)


def is_peft_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and adapter_weights(path) is not None


def latest_tag(path: Path) -> str | None:
    """The tag DeepSpeed's ``latest`` file names, if there is one."""
    try:
        return (path / ZERO_LATEST).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def is_zero_checkpoint(path: Path) -> bool:
    """A Trainer checkpoint whose ``global_step*`` folder (or the one ``latest`` names) holds
    DeepSpeed's optimizer states, or such a folder itself.

    A ``latest`` whose folder was deleted to save space does not count, so that the weights saved
    beside it are read.
    """
    tag = latest_tag(path)
    tag_dirs = [*path.glob("global_step*"), *([path / tag] if tag else [])]
    return any(any(d.glob("*_optim_states.pt")) for d in tag_dirs if d.is_dir()) or (
        any(path.glob("*_optim_states.pt")) and any(path.glob("*_model_states.pt"))
    )


def other_safetensors(path: Path) -> list[Path]:
    """Safetensors files that are neither the standard model file nor an adapter."""
    return sorted(
        f for f in path.glob("*.safetensors") if f.is_file() and f.name not in (SAFETENSORS_SINGLE, *ADAPTER_WEIGHTS)
    )


def hf_format(path: Path) -> str | None:
    """The Hugging Face weight format transformers would load from ``path``, or None."""
    present = [name for name in HF_FILES if (path / name).is_file()]
    if present:
        if len(present) > 1:
            logger.info("%s holds %s; reading %s, as transformers does", path, ", ".join(present), present[0])
        return HF_FILES[present[0]]
    others = other_safetensors(path)
    if len(others) > 1:
        raise CheckpointError(
            f"{path} holds several safetensors files ({', '.join(f.name for f in others)}) but no "
            f"{SAFETENSORS_INDEX} saying how they form one model; restore the index or re-save the model "
            "with save_pretrained"
        )
    return SAFETENSORS_OTHER if others else None


def detect_format(path: str | Path, zero_weights: str = ZERO_AUTO) -> str:
    """The format to read ``path`` as: one of the format names of this module.

    ``zero_weights`` chooses, for a DeepSpeed checkpoint, between the weights the Trainer saved
    beside it and the fp32 master weights (see the module docstring): ``"auto"`` (saved if present,
    else masters), ``"saved"`` (an error when there are none) or ``"master"``.
    Raises :class:`CheckpointError` listing the folder's contents when no format matches.
    """
    if zero_weights not in ZERO_WEIGHTS:
        raise ConfigError(f"zero_weights must be one of {', '.join(map(repr, ZERO_WEIGHTS))}, not {zero_weights!r}")
    path = Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file, not a folder"
        raise CheckpointError(f"{path} {what}; pass the folder that holds the checkpoint's weights")
    if is_peft_adapter(path):
        return PEFT_LORA
    hf = hf_format(path)
    if is_zero_checkpoint(path):
        return _zero_choice(path, hf, zero_weights)
    if hf is not None:
        return hf
    raise CheckpointError(
        f"no checkpoint format recognised in {path} (found: {describe_folder(path)}). Supported: {SUPPORTED}."
        + _hint(path)
    )


def _zero_choice(path: Path, hf: str | None, zero_weights: str) -> str:
    """Which weights of a DeepSpeed checkpoint to read, given the Hugging Face format saved beside it."""
    if hf is None:
        if zero_weights == ZERO_SAVED:
            raise CheckpointError(
                f"zero_weights='saved' was asked for, but {path} holds only DeepSpeed's ZeRO shards, no saved model "
                f"weights (found: {describe_folder(path)}); use zero_weights 'auto' or 'master' to read the fp32 "
                "master weights, or save the weights (stage3_gather_16bit_weights_on_model_save=true)"
            )
        logger.info("%s holds no saved model weights; reading DeepSpeed's fp32 master weights", path)
        return ZERO
    chosen = ZERO if zero_weights == ZERO_MASTER else hf
    logger.info("%s holds %s and %s weights; reading %s (zero_weights=%r)", path, ZERO, hf, chosen, zero_weights)
    return chosen


def describe_folder(path: Path) -> str:
    """The folder's entries (folders with a trailing slash), the first few of them."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(names[:_LISTED]) or "nothing"
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _hint(path: Path) -> str:
    """What a near miss lacks."""
    if (path / ADAPTER_CONFIG).is_file():
        return f" It has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS[0]}: copy the adapter weights next to it."
    tag = latest_tag(path)
    if tag is not None:
        return (
            f" DeepSpeed's {ZERO_LATEST} names {tag}, but {tag}/ with *_optim_states.pt is missing: the checkpoint "
            "was partly deleted; restore it, or pass a folder with the weights saved by save_pretrained."
        )
    if any(path.glob("global_step*")):
        return (
            " It has global_step* folders without *_optim_states.pt: the DeepSpeed checkpoint is incomplete "
            "(was it saved with save_only_model=True?); merge a complete checkpoint."
        )
    if (path / "config.json").is_file():
        return " It has config.json but no weights: copy the weight files, or save the model with save_pretrained."
    return " Pass the folder a Trainer checkpoint or save_pretrained wrote."
