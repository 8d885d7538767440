"""Calibration texts: read from a file or a ``datasets.Dataset`` and tokenized once.

OBM needs only forward passes on unlabeled text of the target domain; the paper finds ~100
samples best (Table 5) and task-related text better than unrelated text (Table 4).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from obim_trainer.errors import CalibrationError
from obim_trainer.text_sources import TextSettings, describe, read_texts

logger = logging.getLogger(__name__)


def load_calibration_texts(
    source: str | Path | Any, num_samples: int = 100, text_field: str = "text", setting: str = "calibration_data"
) -> list[str]:
    """The first ``num_samples`` non-empty texts of a JSONL/JSON/text/parquet file or ``datasets.Dataset``,
    read by :func:`~obim_trainer.text_sources.read_texts` (the reader evaluation and training use too).

    Texts come in file order, so the same inputs always give the same calibration set.
    Raises :class:`CalibrationError` naming the file and the fix when the source is missing,
    empty or unreadable; ``setting`` is the setting the user gave the file to (``eval_data`` for evaluation).
    """
    if num_samples < 1:
        raise CalibrationError(f"calibration_samples must be at least 1 (got {num_samples}); ~100 works best")
    texts = list(islice(read_texts(source, text_field, TextSettings(setting)), num_samples))
    where = describe(source, TextSettings(setting))
    if not texts:
        raise CalibrationError(f"{where} holds no non-empty text; give ~100 samples of the new language/domain")
    if len(texts) < num_samples:
        logger.info("calibration: %s has %d samples (fewer than the %d asked for)", where, len(texts), num_samples)
    return texts


@dataclass
class CalibrationSet:
    """Tokenized calibration samples, unpadded; batches are padded on the fly."""

    input_ids: list[Tensor]
    pad_token_id: int

    @property
    def num_tokens(self) -> int:
        return sum(int(ids.numel()) for ids in self.input_ids)

    def fingerprint(self) -> str:
        """sha256 of the token ids: changes with the texts, the tokenizer, the sample count and max length."""
        digest = hashlib.sha256()
        for ids in self.input_ids:
            digest.update(int(ids.numel()).to_bytes(8, "little"))
            digest.update(ids.to(torch.int64).numpy().tobytes())
        return digest.hexdigest()

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Right-padded ``(input_ids, attention_mask)`` batches, longest samples first to limit padding."""
        if batch_size < 1:
            raise CalibrationError(f"calibration_batch_size must be at least 1 (got {batch_size})")
        order = sorted(range(len(self.input_ids)), key=lambda i: -self.input_ids[i].numel())
        for start in range(0, len(order), batch_size):
            chunk = [self.input_ids[i] for i in order[start : start + batch_size]]
            width = max(int(ids.numel()) for ids in chunk)
            ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, sample in enumerate(chunk):
                ids[row, : sample.numel()] = sample
                mask[row, : sample.numel()] = 1
            yield ids, mask

    def shard(self, rank: int, world_size: int) -> CalibrationSet:
        """This rank's share of the samples (every ``world_size``-th one), for data-parallel statistics."""
        return CalibrationSet(self.input_ids[rank::world_size], self.pad_token_id)

    def token_counts(self, vocab_size: int) -> Tensor:
        """How often each token id occurs (padding never counted): the embedding analogue of Σx²."""
        ids = torch.cat(self.input_ids) if self.input_ids else torch.zeros(0, dtype=torch.long)
        return torch.bincount(ids[ids < vocab_size], minlength=vocab_size)


def tokenize_calibration(texts: Sequence[str], tokenizer: Any, max_length: int = 512) -> CalibrationSet:
    """Tokenize ``texts`` (truncated to ``max_length``, with the tokenizer's special tokens, never padded).

    A tokenizer without a pad token pads batches with its eos token; the attention mask keeps
    those positions out of the statistics anyway.
    """
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        logger.info("the tokenizer has no pad token; padding calibration batches with id %d (masked out)", pad)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    ids = [torch.tensor(e, dtype=torch.long) for e in encoded if len(e) > 0]
    if not ids:
        raise CalibrationError("the calibration texts tokenize to nothing; check the data and the tokenizer")
    return CalibrationSet(input_ids=ids, pad_token_id=int(pad))
