"""Local text files as causal-LM training data: read as calibration and evaluation read them, then packed.

Continued pre-training reads text as a stream cut into fixed-length blocks (no padding, every
token trains). The example script and the CPU demo both read their corpora this way.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

from obim_trainer.errors import ConfigError, OBIMError
from obim_trainer.text_sources import TextSettings, read_texts

TRAINING = TextSettings(source="train", text_field="text_field", error=ConfigError)
"""Training files are named ``train`` in messages; their field is the example config's ``text_field``."""


def _rows(path: str, text_field: str, stamp: tuple[int, int]) -> Iterator[dict[str, str]]:
    """The rows of the training dataset; ``stamp`` (size, mtime) only keys the ``datasets`` cache entry."""
    del stamp
    for text in read_texts(path, text_field, TRAINING):
        yield {text_field: text}


def load_text_file(path: str | Path, text_field: str = "text") -> Any:
    """A local JSONL/JSON/text/parquet file as a ``datasets.Dataset`` with one column, ``text_field``.

    The rows are the non-empty texts :func:`~obim_trainer.text_sources.read_texts` reads, so a file
    trains on the very samples that calibration and evaluation read from it. They are written to the
    ``datasets`` cache (Arrow on disk, memory-mapped), keyed by the file's path, size and mtime, so a
    large corpus is never held in memory. Raises :class:`ConfigError` naming the file and the fix.
    """
    from datasets import Dataset, Features, Value
    from datasets.exceptions import DatasetGenerationError

    path = Path(path)
    if next(read_texts(path, text_field, TRAINING), None) is None:  # checks the file, reads one sample
        raise ConfigError(f"train file {path} holds no non-empty text; give it one sample per line or record")
    stat = path.stat()
    try:
        return Dataset.from_generator(
            _rows,
            features=Features({text_field: Value("string")}),
            gen_kwargs={"path": str(path), "text_field": text_field, "stamp": (stat.st_size, stat.st_mtime_ns)},
        )
    except DatasetGenerationError as exc:
        if isinstance(exc.__cause__, OBIMError):  # a bad line further down: our message, not datasets' wrapper
            raise exc.__cause__ from None
        raise


def pack_blocks(dataset: Any, tokenizer: Any, text_field: str, block_size: int) -> Any:
    """Tokenize ``dataset[text_field]`` (an end-of-text token after each record) and cut the token
    stream into blocks of ``block_size``; within each map batch the tail shorter than a block is dropped."""
    if text_field not in dataset.column_names:
        raise ConfigError(f"the data has no '{text_field}' column (columns: {dataset.column_names}); set text_field")

    def tokenize(rows: dict[str, list[str]]) -> dict[str, Any]:
        ids = tokenizer(rows[text_field])["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return {"input_ids": [sample + eos for sample in ids]}

    def group(rows: dict[str, list[list[int]]]) -> dict[str, Any]:
        stream = list(chain.from_iterable(rows["input_ids"]))
        full = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, full, block_size)] or [stream]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    return tokenized.map(group, batched=True)
