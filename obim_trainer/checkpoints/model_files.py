"""The non-weight files of a model folder: config, generation config and tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

from obim_trainer.errors import CheckpointError

CONFIG_FILES = ("config.json", "generation_config.json")
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


def copy_model_files(config_source: Path, tokenizer_source: Path | None, dest: Path) -> list[str]:
    """Copy the config (and generation config) of ``config_source`` and the tokenizer files of
    ``tokenizer_source`` (default: ``config_source``) into ``dest``; return the names copied."""
    if not (config_source / "config.json").is_file():
        raise CheckpointError(
            f"{config_source} has no config.json; the base folder must be a transformers model folder"
        )
    copied = []
    for name in CONFIG_FILES:
        if (config_source / name).is_file():
            shutil.copy2(config_source / name, dest / name)
            copied.append(name)
    source = tokenizer_source or config_source
    if tokenizer_source is not None and not source.is_dir():
        raise CheckpointError(f"tokenizer source {source} does not exist; pass a folder with tokenizer files")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    return copied
