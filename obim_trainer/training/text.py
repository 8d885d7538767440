"""Local text files as causal-LM training data: loaded with ``datasets``, tokenized and packed.

Continued pre-training reads text as a stream cut into fixed-length blocks (no padding, every
token trains). The example script and the CPU demo both read their corpora this way.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Any

from obim_trainer.errors import ConfigError

FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


def load_text_file(path: str | Path) -> Any:
    """A local JSONL/JSON/text/parquet file as a ``datasets.Dataset`` (one row per record or line)."""
    from datasets import load_dataset

    path = Path(path)
    if path.suffix not in FORMATS:
        raise ConfigError(f"data file {path} has an unknown extension; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist; fix the path")
    return load_dataset(FORMATS[path.suffix], data_files=str(path), split="train")


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
