"""Calibration texts: read from a file or a ``datasets.Dataset`` and tokenized once.

OBM needs only forward passes on unlabeled text of the target domain; the paper finds ~100
samples best (Table 5) and task-related text better than unrelated text (Table 4).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from obim_trainer.errors import CalibrationError

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


def _from_jsonl(path: Path, field: str, limit: int) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(
                    f"{path} line {number} is not valid JSON ({exc.msg}); fix or remove that line"
                ) from None
            if not isinstance(row, dict) or field not in row:
                found = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise CalibrationError(
                    f"{path} line {number} has no '{field}' field (found: {found}); "
                    "pass --calibration-text-field with the right name"
                )
            if str(row[field]).strip():
                texts.append(str(row[field]))
                if len(texts) == limit:
                    break
    return texts


def _from_json(path: Path, field: str, limit: int) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return _from_jsonl(path, field, limit)  # JSON Lines saved as .json
    if not isinstance(data, list):
        raise CalibrationError(f"{path} must hold a list of objects with a '{field}' field, or JSON Lines")
    rows = [r.get(field) if isinstance(r, dict) else r for r in data]
    return [str(t) for t in rows if t is not None and str(t).strip()][:limit]


def _from_parquet(path: Path, field: str, limit: int) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise CalibrationError(f"{path} is not a readable parquet file ({exc})") from None
    if field not in table.column_names:
        raise CalibrationError(
            f"{path} has no column '{field}' (columns: {', '.join(table.column_names)}); pass --calibration-text-field"
        )
    return [str(t) for t in table.column(field).to_pylist() if t is not None and str(t).strip()][:limit]


def _from_dataset(dataset: Any, field: str, limit: int) -> list[str]:
    if field not in dataset.column_names:
        raise CalibrationError(
            f"the calibration dataset has no column '{field}' (columns: {', '.join(dataset.column_names)})"
        )
    texts = []
    for row in dataset:
        if str(row[field]).strip():
            texts.append(str(row[field]))
            if len(texts) == limit:
                break
    return texts


def load_calibration_texts(source: str | Path | Any, num_samples: int = 100, text_field: str = "text") -> list[str]:
    """The first ``num_samples`` non-empty texts of a JSONL/JSON/text/parquet file or ``datasets.Dataset``.

    Text files hold one sample per non-empty line. Raises :class:`CalibrationError` naming the
    file and the fix when the source is missing, empty or unreadable.
    """
    if num_samples < 1:
        raise CalibrationError(f"calibration_samples must be at least 1, got {num_samples}")
    if hasattr(source, "column_names"):
        texts = _from_dataset(source, text_field, num_samples)
        where = "the calibration dataset"
    else:
        path = Path(source)
        if not path.is_file():
            raise CalibrationError(
                f"calibration file {path} does not exist; pass an existing file to --calibration-data"
            )
        suffix = path.suffix.lower()
        try:
            if suffix == ".jsonl":
                texts = _from_jsonl(path, text_field, num_samples)
            elif suffix == ".json":
                texts = _from_json(path, text_field, num_samples)
            elif suffix == ".txt":
                lines = path.read_text(encoding="utf-8").splitlines()
                texts = [line for line in lines if line.strip()][:num_samples]
            elif suffix == ".parquet":
                texts = _from_parquet(path, text_field, num_samples)
            else:
                raise CalibrationError(
                    f"calibration file {path} has an unknown extension; use one of {', '.join(SUFFIXES)}"
                )
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"cannot read calibration file {path} ({exc}); check it is UTF-8 text") from None
        where = str(path)
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
            digest.update(ids.to(torch.int64).numpy().tobytes())
            digest.update(b"\xff" * 8)
        return digest.hexdigest()

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Right-padded ``(input_ids, attention_mask)`` batches, longest samples first to limit padding."""
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
        """This rank's share of the samples (every world_size-th one), for data-parallel statistics."""
        return CalibrationSet(self.input_ids[rank::world_size], self.pad_token_id)

    def token_counts(self, vocab_size: int) -> Tensor:
        """How often each token id occurs (padding never counted): the embedding analogue of Σx²."""
        ids = torch.cat(self.input_ids) if self.input_ids else torch.zeros(0, dtype=torch.long)
        return torch.bincount(ids[ids < vocab_size], minlength=vocab_size)


def tokenize_calibration(texts: Sequence[str], tokenizer: Any, max_length: int = 512) -> CalibrationSet:
    """Tokenize ``texts`` (truncated to ``max_length``); empty results are dropped."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        logger.info("the tokenizer has no pad token; padding calibration batches with id %d (masked out)", pad)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    ids = [torch.tensor(e, dtype=torch.long) for e in encoded if len(e) > 0]
    if not ids:
        raise CalibrationError("the calibration texts tokenize to nothing; check the data and the tokenizer")
    return CalibrationSet(input_ids=ids, pad_token_id=int(pad))
