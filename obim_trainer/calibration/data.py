"""Calibration texts: read from a file or a ``datasets.Dataset`` and tokenized once.

OBM needs only forward passes on unlabeled text of the target domain; the paper finds ~100
samples best (Table 5) and task-related text better than unrelated text (Table 4).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from obim_trainer.errors import CalibrationError
from obim_trainer.settings.names import setting_name

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


def _field_hint() -> str:
    return f"set {setting_name('calibration_text_field', 'NAME')} to the field that holds the text"


def _as_text(value: Any, field: str, where: str) -> str | None:
    """The sample's text, ``None`` for a missing/blank one; anything but a string is an error."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise CalibrationError(f"{where}: field '{field}' holds {type(value).__name__}, not text; {_field_hint()}")
    return value if value.strip() else None


def _first_texts(values: Iterable[str | None], limit: int) -> list[str]:
    texts: list[str] = []
    for text in values:
        if text is not None:
            texts.append(text)
            if len(texts) == limit:
                break
    return texts


def _jsonl_values(path: Path, field: str) -> Iterator[str | None]:
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
            yield _row_text(row, field, f"{path} line {number}")


def _row_text(row: Any, field: str, where: str) -> str | None:
    if not isinstance(row, dict) or field not in row:
        found = ", ".join(row) if isinstance(row, dict) else f"a {type(row).__name__}, not an object"
        raise CalibrationError(f"{where} has no '{field}' field (found: {found}); {_field_hint()}")
    return _as_text(row[field], field, where)


def _json_values(path: Path, field: str) -> Iterator[str | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        yield from _jsonl_values(path, field)  # JSON Lines saved as .json
        return
    if not isinstance(data, list):
        raise CalibrationError(f"{path} must hold a list of objects with a '{field}' field, or JSON Lines")
    for index, row in enumerate(data):
        yield _row_text(row, field, f"{path} item {index}")


def _txt_values(path: Path) -> Iterator[str | None]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            text = line.rstrip("\r\n")
            yield text if text.strip() else None


def _parquet_values(path: Path, field: str) -> Iterator[str | None]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        columns = table.schema_arrow.names
    except Exception as exc:
        raise CalibrationError(f"{path} is not a readable parquet file ({exc}); check the file") from None
    if field not in columns:
        raise CalibrationError(f"{path} has no column '{field}' (columns: {', '.join(columns)}); {_field_hint()}")
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield _as_text(value, field, str(path))


def _dataset_values(dataset: Any, field: str) -> Iterator[str | None]:
    columns = dataset.column_names
    if isinstance(columns, dict):
        raise CalibrationError(
            f"the calibration data is a DatasetDict with splits {', '.join(columns)}; pass one split, "
            "e.g. dataset['train']"
        )
    if columns is not None and field not in columns:
        raise CalibrationError(
            f"the calibration dataset has no column '{field}' (columns: {', '.join(columns)}); {_field_hint()}"
        )
    for row in dataset:
        yield _row_text(row, field, "the calibration dataset")


def _file_values(path: Path, field: str, setting: str) -> Iterator[str | None]:
    """The texts of one file; a wrong path names ``setting`` as the user wrote it."""
    example = {"LANG": "FILE"} if setting == "eval_data" else "FILE"  # eval_data is per language
    if not path.exists():
        raise CalibrationError(
            f"{setting.replace('_', ' ').removesuffix(' data')} file {path} does not exist; "
            f"set {setting_name(setting, example)} to an existing file"
        )
    if not path.is_file():
        raise CalibrationError(
            f"{path} is not a file; set {setting_name(setting, example)} to a {'/'.join(SUFFIXES)} file"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_values(path, field)
    if suffix == ".json":
        return _json_values(path, field)
    if suffix == ".txt":
        return _txt_values(path)
    if suffix == ".parquet":
        return _parquet_values(path, field)
    raise CalibrationError(f"calibration file {path} has an unknown extension; use one of {', '.join(SUFFIXES)}")


def load_calibration_texts(
    source: str | Path | Any, num_samples: int = 100, text_field: str = "text", setting: str = "calibration_data"
) -> list[str]:
    """The first ``num_samples`` non-empty texts of a JSONL/JSON/text/parquet file or ``datasets.Dataset``.

    Texts come in file order, so the same inputs always give the same calibration set. JSON and
    JSONL hold objects with ``text_field``; text files hold one sample per non-empty line.
    Raises :class:`CalibrationError` naming the file and the fix when the source is missing,
    empty or unreadable; ``setting`` is the setting the user gave the file to (``eval_data`` for evaluation).
    """
    if num_samples < 1:
        raise CalibrationError(f"calibration_samples must be at least 1 (got {num_samples}); ~100 works best")
    if hasattr(source, "column_names"):
        where = "the calibration dataset"
        values = _dataset_values(source, text_field)
    else:
        path = Path(source)
        where = str(path)
        values = _file_values(path, text_field, setting)
    try:
        texts = _first_texts(values, num_samples)
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read calibration data {where} ({exc}); check it is UTF-8 text") from None
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
