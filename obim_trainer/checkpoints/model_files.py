"""The non-weight files of a model folder: config, generation config, custom code and tokenizer.

A merged model is the base architecture with new weights, so its config (and any
``trust_remote_code`` modules) come from the base, and its tokenizer from the base or from
wherever the user says the trained tokenizer lives.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from obim_trainer.errors import CheckpointError, OutputError

logger = logging.getLogger(__name__)

CONFIG_FILES = ("config.json", "generation_config.json")
CONFIG_PATTERNS = ("configuration_*.py", "modeling_*.py")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)
TOKENIZER_PATTERNS = ("tokenization_*.py", "*.tiktoken")
TOKENIZER_FOLDERS = ("additional_chat_templates",)


def _matching(folder: Path, names: tuple[str, ...], patterns: tuple[str, ...]) -> list[Path]:
    found = [folder / name for name in names if (folder / name).is_file()]
    found += sorted(p for pattern in patterns for p in folder.glob(pattern) if p.is_file())
    return found


def copy_model_files(config_source: Path, tokenizer_source: Path | None, dest: Path) -> list[str]:
    """Copy the config, generation config and custom-code modules of ``config_source`` and the
    tokenizer files of ``tokenizer_source`` (default: ``config_source``) into ``dest``.

    Returns the names copied. Raises :class:`CheckpointError` when ``config_source`` has no
    config.json, or when an explicit ``tokenizer_source`` is missing or holds no tokenizer.
    """
    config_source = Path(config_source)
    if not (config_source / "config.json").is_file():
        raise CheckpointError(
            f"{config_source} has no config.json; pass the base model's folder as saved by save_pretrained"
        )
    source = Path(tokenizer_source) if tokenizer_source is not None else config_source
    tokenizer = _matching(source, TOKENIZER_FILES, TOKENIZER_PATTERNS)
    folders = [source / name for name in TOKENIZER_FOLDERS if (source / name).is_dir()]
    if tokenizer_source is not None and not tokenizer:
        listing = "does not exist" if not source.is_dir() else "holds no tokenizer files"
        raise CheckpointError(
            f"tokenizer source {source} {listing}; pass a folder with tokenizer.json or tokenizer.model "
            f"(one of {', '.join(TOKENIZER_FILES)})"
        )
    if not tokenizer:
        logger.warning("%s holds no tokenizer files; the output will have none (pass a tokenizer source)", source)
    copied = []
    try:
        for file in [*_matching(config_source, CONFIG_FILES, CONFIG_PATTERNS), *tokenizer]:
            shutil.copy2(file, dest / file.name)
            copied.append(file.name)
        for folder in folders:
            shutil.copytree(folder, dest / folder.name)
            copied.append(folder.name)
    except OSError as exc:
        raise OutputError(
            f"cannot copy model files into {dest} ({exc}); check free disk space and permissions"
        ) from None
    return copied
