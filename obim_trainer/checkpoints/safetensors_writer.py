"""Writing sharded safetensors one tensor at a time.

``safetensors.torch.save_file`` needs a whole shard in memory (5 GB by default). The merge
knows every output name, shape and dtype before it starts, so all shard boundaries and
headers can be computed up front and each shard written as a stream: 8-byte header length,
JSON header padded with spaces to 8-byte alignment, then the raw bytes of each tensor as it
is produced. Memory is one tensor, and the files are what transformers writes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch
from torch import Tensor

from obim_trainer.errors import ConfigError

_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")

PlanEntry = tuple[str, tuple[int, ...], torch.dtype]


def parse_size(text: str | int) -> int:
    """``"5GB"`` → 5·10⁹, ``"2GiB"`` → 2·2³⁰, ``"500MB"``, ``"1e9"``, ``1000`` (as transformers reads sizes)."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(str(text))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise ConfigError(f"cannot read the size {text!r}; write it like 5GB, 500MB or 2GiB")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"a shard size must be positive, got {text!r}")
    return size


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def _shard_plan(plan: Sequence[PlanEntry], max_shard_size: int) -> list[list[PlanEntry]]:
    shards: list[list[PlanEntry]] = [[]]
    size = 0
    for entry in plan:
        nbytes = _nbytes(entry[1], entry[2])
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _header_bytes(entries: Sequence[PlanEntry], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in entries:
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
        nbytes = _nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _tensor_bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class ShardedSafetensorsWriter:
    """Stream tensors, in plan order, into shards of at most ``max_shard_size`` bytes.

    One shard is written as ``model.safetensors``; several as
    ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``. A tensor
    larger than ``max_shard_size`` gets a shard of its own.
    """

    def __init__(
        self,
        folder: Path,
        plan: Sequence[PlanEntry],
        max_shard_size: int,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._shards = _shard_plan(list(plan), max_shard_size)
        n = len(self._shards)
        self._names = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._queue = [(s, e) for s, entries in enumerate(self._shards) for e in entries]
        self._position = 0
        self._open_shard = -1
        self._handle: BinaryIO | None = None
        self._written: list[Path] = []

    def _start_shard(self, shard: int) -> None:
        self._finish_shard()
        path = self.folder / self._names[shard]
        self._handle = path.open("wb")
        self._handle.write(_header_bytes(self._shards[shard], self.metadata))
        self._open_shard = shard
        self._written.append(path)

    def _finish_shard(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def write(self, name: str, tensor: Tensor) -> None:
        """Append the next planned tensor; its name, shape and dtype must match the plan."""
        if self._position >= len(self._queue):
            raise ValueError(f"tensor {name} was not planned: all {len(self._queue)} planned tensors are written")
        shard, (p_name, p_shape, p_dtype) = self._queue[self._position]
        if name != p_name or tuple(tensor.shape) != tuple(p_shape) or tensor.dtype != p_dtype:
            raise ValueError(
                f"expected tensor {p_name} {tuple(p_shape)} {p_dtype} next, "
                f"got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if shard != self._open_shard:
            self._start_shard(shard)
        assert self._handle is not None
        self._handle.write(_tensor_bytes(tensor))
        self._position += 1

    def close(self) -> list[Path]:
        """Finish the last shard, write the index (several shards) and return the files written."""
        if self._position != len(self._queue):
            missing = [e[0] for _, e in self._queue[self._position :]]
            raise ValueError(f"{len(missing)} planned tensor(s) were not written, first: {missing[0]}")
        if not self._queue:
            self._start_shard(0)
        self._finish_shard()
        if len(self._shards) > 1:
            weight_map = {e[0]: self._names[s] for s, e in self._queue}
            total = sum(_nbytes(shape, dtype) for _, (_, shape, dtype) in self._queue)
            index = self.folder / "model.safetensors.index.json"
            index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
            self._written.append(index)
        files, self._written = list(self._written), []
        return files

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # On failure the partial files stay for the caller's atomic folder to discard.
        if self._handle is not None:
            self._handle.close()
            self._handle = None
