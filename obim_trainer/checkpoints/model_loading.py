"""A runnable model built from any checkpoint reader, for the calibration forward pass.

OBIM's statistics come from running each checkpoint on the calibration texts. ``from_pretrained``
cannot open a DeepSpeed checkpoint without saved weights or a LoRA adapter, and on a folder holding
both it would read the 16-bit file rather than the fp32 masters being merged. So every checkpoint is
built the same way: the architecture from a config (the checkpoint's own ``config.json``, which
records an extended vocabulary, else the base's), the weights from its reader — exactly the tensors
the merge reads. transformers does the loading (``from_pretrained(None, config=…, state_dict=…)``),
so tied weights, non-persistent buffers and key renames behave as in ``from_pretrained``.

Memory: one model, as ``from_pretrained`` would need; the merge itself never holds one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from obim_trainer.checkpoints.reader import CheckpointReader
from obim_trainer.errors import CheckpointError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
_LISTED = 5


def config_folder(reader: CheckpointReader, fallback: Path) -> Path:
    """Where the checkpoint's architecture is described: its own folder if it has a config.json, else ``fallback``
    (the base: LoRA adapters and bare ``global_step*`` folders carry none)."""
    return reader.path if (reader.path / CONFIG_FILE).is_file() else Path(fallback)


def _model_class(config: Any) -> type[nn.Module]:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return type(AutoModelForCausalLM.from_config(config))
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"cannot build a causal LM from the config of {getattr(config, 'name_or_path', '') or 'the model'} "
            f"({exc}); activation statistics need a transformers causal LM architecture"
        ) from None


def _fit_vocabulary(config: Any, model_class: type[nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Give the config the vocabulary size the weights have (a LoRA adapter that saved resized embeddings
    describes itself with the base's config)."""
    with torch.device("meta"):
        meta = model_class(config)
    embedding = meta.get_input_embeddings()
    name = next((n for n, p in meta.named_parameters() if p is embedding.weight), None)
    if name is None or name not in state or state[name].shape[0] == embedding.weight.shape[0]:
        return
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    logger.info("%s has %d rows; building the model with that vocabulary size", name, state[name].shape[0])
    text_config.vocab_size = int(state[name].shape[0])


def load_model(reader: CheckpointReader, fallback_config: Path, device: torch.device | str = "cpu") -> nn.Module:
    """The checkpoint as a causal LM in eval mode on ``device``, its weights exactly the reader's tensors."""
    from transformers import AutoConfig

    folder = config_folder(reader, fallback_config)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the model config in {folder} ({exc}); it must hold config.json") from None
    state = {name: reader.read(name) for name in reader.tensor_infos()}
    model_class = _model_class(config)
    _fit_vocabulary(config, model_class, state)
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=state, dtype="auto", output_loading_info=True
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:_LISTED]) + (f" and {len(missing) - _LISTED} more" if len(missing) > _LISTED else "")
        raise CheckpointError(
            f"{reader.path} lacks weights its architecture ({folder / CONFIG_FILE}) needs: {shown}. The checkpoint "
            "is incomplete or its config belongs to another model; re-save it with save_pretrained"
        )
    return model.to(device).eval()
