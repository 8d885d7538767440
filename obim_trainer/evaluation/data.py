"""Evaluation sets, one per language: text files or datasets, tokenized once.

The sources are the ones calibration accepts, read by the same reader
(:func:`~obim_trainer.text_sources.read_texts`: JSONL/JSON/text/parquet files, ``datasets.Dataset``
with a text column), plus datasets that are already tokenized (an ``input_ids`` column, like
the ``eval_dataset`` given to a Trainer), so the same dict can serve both.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import islice
from typing import Any

import torch

from obim_trainer.calibration import CalibrationSet, tokenize_calibration
from obim_trainer.errors import CalibrationError, ConfigError
from obim_trainer.text_sources import TextSettings, describe, read_texts

EvalSets = dict[str, CalibrationSet]
EVALUATION = TextSettings(source="eval_data")


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def _pretokenized(dataset: Any, text_field: str) -> bool:
    columns = getattr(dataset, "column_names", None)
    return isinstance(columns, list) and "input_ids" in columns and text_field not in columns


def _from_token_ids(dataset: Any, tokenizer: Any, max_samples: int, max_length: int) -> CalibrationSet:
    ids = []
    for row in dataset.select_columns(["input_ids"]):
        sample = torch.as_tensor(row["input_ids"], dtype=torch.long)[:max_length]
        if sample.numel() > 1:  # one token predicts nothing
            ids.append(sample)
            if len(ids) == max_samples:
                break
    if not ids:
        raise CalibrationError("the dataset's input_ids hold no sample of two or more tokens")
    return CalibrationSet(input_ids=ids, pad_token_id=_pad_id(tokenizer))


def load_eval_sets(
    sources: Mapping[str, Any],
    tokenizer: Any,
    *,
    max_samples: int = 200,
    max_length: int = 512,
    text_field: str = "text",
) -> EvalSets:
    """Tokenized samples per language (the first ``max_samples`` of each source, in order).

    Raises :class:`ConfigError` naming the language and the fix when a source is missing,
    empty or unreadable.
    """
    if max_samples < 1:
        raise ConfigError(f"eval_samples must be at least 1 (got {max_samples})")
    if not sources:
        raise ConfigError("eval_data is empty; give {language: file or dataset}, e.g. {'ja': 'ja_eval.jsonl'}")
    sets: EvalSets = {}
    for language, source in sources.items():
        try:
            if _pretokenized(source, text_field):
                sets[language] = _from_token_ids(source, tokenizer, max_samples, max_length)
            else:
                texts = list(islice(read_texts(source, text_field, EVALUATION), max_samples))
                if not texts:
                    raise CalibrationError(f"{describe(source, EVALUATION)} holds no non-empty text")
                sets[language] = tokenize_calibration(texts, tokenizer, max_length=max_length)
        except CalibrationError as exc:
            raise ConfigError(f"eval_data['{language}']: {exc}") from None
    return sets
