"""Tokenized calibration sets, cached per user by everything that decides the token ids.

The statistics of a checkpoint are cached under a key made of the calibration set's token ids
(:meth:`~obim_trainer.calibration.data.CalibrationSet.fingerprint`). Loading a tokenizer to
recompute those ids imports transformers, which takes longer than merging a small model; with
this cache, a merge whose statistics exist needs neither. The key covers the texts, the maximum
length, the transformers version and the content of every file of the tokenizer's folder except
weight files, so a changed tokenizer is a miss, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from obim_trainer._user_cache import cache_dir, installed_version
from obim_trainer.calibration.data import CalibrationSet
from obim_trainer.checkpoints.atomic import write_atomically

logger = logging.getLogger(__name__)

_FORMAT = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".npz", ".onnx")
"""Files that never take part in tokenization (model weights, optimizer and RNG states)."""


def tokenizer_digest(folder: Path) -> str:
    """sha256 over the names and contents of the folder's top-level files, weight files excluded."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def _entry(texts: Sequence[str], tokenizer_dir: Path, max_length: int) -> Path:
    transformers_version = installed_version("transformers")
    identity = json.dumps([_FORMAT, transformers_version, tokenizer_digest(tokenizer_dir), max_length, list(texts)])
    return cache_dir("calibration") / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.json"


def cached_tokenization(
    texts: Sequence[str], tokenizer_dir: Path, max_length: int, tokenize: Callable[[], CalibrationSet]
) -> CalibrationSet:
    """The calibration set of ``texts`` as ``tokenize()`` makes it with the tokenizer in ``tokenizer_dir``: from
    the cache when these texts were tokenized with these tokenizer files before, else tokenized and cached."""
    entry = _entry(texts, tokenizer_dir, max_length)
    if entry.is_file():
        try:
            data = json.loads(entry.read_text())
            return CalibrationSet([torch.tensor(ids, dtype=torch.long) for ids in data["input_ids"]], data["pad"])
        except (OSError, ValueError, KeyError, TypeError):
            logger.info("ignoring an unreadable cached calibration set %s", entry)
    calibration = tokenize()
    record = {"pad": calibration.pad_token_id, "input_ids": [ids.tolist() for ids in calibration.input_ids]}
    write_atomically(entry, json.dumps(record).encode())
    return calibration
