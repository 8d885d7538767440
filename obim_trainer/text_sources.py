"""Text samples from a file or a ``datasets.Dataset``: the one reader calibration, evaluation and training share.

A file of each suffix is read the same way wherever it is given, so the samples a merge calibrates
on, the ones it is evaluated on and the ones a model trains on never depend on who read the file:

* ``.jsonl``: one object per line, the text in ``text_field``; blank lines are skipped;
* ``.json``: a list of such objects, or JSON Lines saved as ``.json``;
* ``.txt``: one sample per line (line ends stripped);
* ``.parquet``: the ``text_field`` column;
* a ``datasets.Dataset``: its ``text_field`` column (one split, not a ``DatasetDict``).

Suffixes are matched case-insensitively. Null and blank texts are skipped; anything else that is
not a string is an error. Every error names the file (line or item) and the setting that fixes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obim_trainer.errors import CalibrationError, OBIMError
from obim_trainer.settings.names import setting_name

SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


@dataclass(frozen=True)
class TextSettings:
    """Where the user set the source and its text field (for error messages), and the error to raise."""

    source: str = "calibration_data"
    text_field: str | None = None
    """The setting naming the field; ``<source less _data>_text_field`` (``eval_text_field``) by default."""
    error: type[OBIMError] = CalibrationError

    @property
    def label(self) -> str:
        """``calibration``, ``eval``, ``train``: how messages name the data."""
        return self.source.replace("_", " ").removesuffix(" data")

    def example(self) -> str | dict[str, str]:
        """How a value of ``source`` looks: eval data is given per language."""
        return {"LANG": "FILE"} if self.source == "eval_data" else "FILE"

    def field_hint(self) -> str:
        field = self.text_field or f"{self.source.removesuffix('_data')}_text_field"
        return f"set {setting_name(field, 'NAME')} to the field that holds the text"


CALIBRATION = TextSettings()


def _as_text(value: Any, field: str, where: str, settings: TextSettings) -> str | None:
    """The sample's text, ``None`` for a missing/blank one; anything but a string is an error."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise settings.error(
            f"{where}: field '{field}' holds {type(value).__name__}, not text; {settings.field_hint()}"
        )
    return value if value.strip() else None


def _row_text(row: Any, field: str, where: str, settings: TextSettings) -> str | None:
    if not isinstance(row, dict) or field not in row:
        found = ", ".join(row) if isinstance(row, dict) else f"a {type(row).__name__}, not an object"
        raise settings.error(f"{where} has no '{field}' field (found: {found}); {settings.field_hint()}")
    return _as_text(row[field], field, where, settings)


def _jsonl_values(path: Path, field: str, settings: TextSettings) -> Iterator[str | None]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise settings.error(
                    f"{path} line {number} is not valid JSON ({exc.msg}); fix or remove that line"
                ) from None
            yield _row_text(row, field, f"{path} line {number}", settings)


def _json_values(path: Path, field: str, settings: TextSettings) -> Iterator[str | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        yield from _jsonl_values(path, field, settings)  # JSON Lines saved as .json
        return
    if not isinstance(data, list):
        raise settings.error(f"{path} must hold a list of objects with a '{field}' field, or JSON Lines")
    for index, row in enumerate(data):
        yield _row_text(row, field, f"{path} item {index}", settings)


def _txt_values(path: Path, _field: str, _settings: TextSettings) -> Iterator[str | None]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            text = line.rstrip("\r\n")
            yield text if text.strip() else None


def _parquet_values(path: Path, field: str, settings: TextSettings) -> Iterator[str | None]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        columns = table.schema_arrow.names
    except Exception as exc:
        raise settings.error(f"{path} is not a readable parquet file ({exc}); check the file") from None
    if field not in columns:
        raise settings.error(f"{path} has no column '{field}' (columns: {', '.join(columns)}); {settings.field_hint()}")
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield _as_text(value, field, str(path), settings)


READERS = {".jsonl": _jsonl_values, ".json": _json_values, ".txt": _txt_values, ".parquet": _parquet_values}
"""Suffix → reader of its values (``None`` for a blank sample)."""


def _dataset_values(dataset: Any, field: str, settings: TextSettings) -> Iterator[str | None]:
    where = f"the {settings.label} dataset"
    columns = dataset.column_names
    if isinstance(columns, dict):
        raise settings.error(
            f"{where} is a DatasetDict with splits {', '.join(columns)}; pass one split, e.g. dataset['train']"
        )
    if columns is not None and field not in columns:
        raise settings.error(
            f"{where} has no column '{field}' (columns: {', '.join(columns)}); {settings.field_hint()}"
        )
    for row in dataset:
        yield _row_text(row, field, where, settings)


def check_text_file(path: Path, settings: TextSettings) -> None:
    """Raise ``settings.error`` naming ``path`` and the fix unless it is an existing file of a known suffix."""
    setting = setting_name(settings.source, settings.example())
    if not path.exists():
        raise settings.error(f"{settings.label} file {path} does not exist; set {setting} to an existing file")
    if not path.is_file():
        raise settings.error(f"{path} is not a file; set {setting} to a {'/'.join(SUFFIXES)} file")
    if path.suffix.lower() not in READERS:
        raise settings.error(f"{settings.label} file {path} has an unknown extension; use one of {', '.join(SUFFIXES)}")


def describe(source: str | Path | Any, settings: TextSettings = CALIBRATION) -> str:
    """How messages name ``source``: its path, or ``the <label> dataset``."""
    return f"the {settings.label} dataset" if hasattr(source, "column_names") else str(source)


def read_texts(
    source: str | Path | Any, text_field: str = "text", settings: TextSettings = CALIBRATION
) -> Iterator[str]:
    """The non-empty texts of a file or ``datasets.Dataset``, in order, read lazily (a caller that
    stops early reads no further). Raises ``settings.error`` naming the file and the fix."""
    if hasattr(source, "column_names"):
        values = _dataset_values(source, text_field, settings)
    else:
        path = Path(source)
        check_text_file(path, settings)
        values = READERS[path.suffix.lower()](path, text_field, settings)
    try:
        yield from (text for text in values if text is not None)
    except (OSError, UnicodeDecodeError) as exc:
        raise settings.error(
            f"cannot read {settings.label} data {describe(source, settings)} ({exc}); check it is UTF-8 text"
        ) from None
