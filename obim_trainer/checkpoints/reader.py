"""Reading model folders tensor by tensor.

A merge touches every tensor of K+1 models; holding one model, let alone K, is not an
option at 7B×4 on 24 GB. Readers therefore open files lazily and serve one tensor at a
time: safetensors through ``safe_open`` (header parsed once, data read per tensor), and
``.bin`` files through ``torch.load(mmap=True, weights_only=True)`` so that only the pages
of the tensor being read come into memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from obim_trainer.errors import CheckpointError

logger = logging.getLogger(__name__)

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
FINGERPRINT_EDGE = 64 * 1024

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of a stored tensor and the file that holds it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


class CheckpointReader(ABC):
    """One model folder, read one tensor at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @abstractmethod
    def tensor_infos(self) -> dict[str, TensorInfo]:
        """Every stored tensor, in file order."""

    @abstractmethod
    def read(self, name: str) -> Tensor:
        """One tensor in its stored dtype, on the CPU, contiguous."""

    @abstractmethod
    def weight_files(self) -> list[Path]:
        """The files holding the weights."""

    def fingerprint(self) -> str:
        """A cheap, change-detecting fingerprint of the weight files (not a content hash).

        sha256 over each file's name, size, modification time and its first and last 64 KiB:
        rewriting a checkpoint changes it, copying it with a new mtime changes it too (which
        only costs a recomputation, never a stale reuse).
        """
        digest = hashlib.sha256()
        for f in sorted(self.weight_files()):
            stat = f.stat()
            digest.update(f"{f.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            with f.open("rb") as handle:
                digest.update(handle.read(FINGERPRINT_EDGE))
                if stat.st_size > FINGERPRINT_EDGE:
                    handle.seek(max(FINGERPRINT_EDGE, stat.st_size - FINGERPRINT_EDGE))
                    digest.update(handle.read())
        return digest.hexdigest()

    def close(self) -> None:  # noqa: B027 - readers without handles need nothing
        """Release file handles."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def _corrupt(file: Path, detail: object) -> CheckpointError:
    return CheckpointError(
        f"{file} is not a readable weights file ({detail}); it is corrupt or truncated: re-save or re-download it"
    )


def _read_index(index_file: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise _corrupt(index_file, f"no valid weight_map: {exc}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _corrupt(index_file, "empty weight_map")
    return weight_map


def _safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header against the file size; return it and where the data starts."""
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            header_len = int.from_bytes(prefix, "little")
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(file, exc) from None
    data_size = size - 8 - header_len
    end = max((meta["data_offsets"][1] for key, meta in header.items() if key != "__metadata__"), default=0)
    if end > data_size:
        raise _corrupt(file, f"header describes {end} bytes of data but the file holds {data_size}")
    return header, 8 + header_len


class SafetensorsReader(CheckpointReader):
    """``model.safetensors`` or shards listed in ``model.safetensors.index.json``.

    Tensors are read with ``pread`` into buffers they own rather than through a memory map:
    mapped pages of every input file would otherwise stay resident and count against the
    merge's memory, which must stay at a few tensors.
    """

    def __init__(self, path: Path, files: list[Path]) -> None:
        super().__init__(path)
        self._files = files
        self._infos: dict[str, TensorInfo] = {}
        self._spans: dict[str, tuple[int, int]] = {}
        for file in files:
            header, data_start = _safetensors_header(file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                dtype = _ST_DTYPES.get(meta["dtype"])
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {meta['dtype']}")
                self._infos[name] = TensorInfo(name, tuple(meta["shape"]), dtype, file)
                begin, end = meta["data_offsets"]
                expected = torch.Size(meta["shape"]).numel() * torch.empty((), dtype=dtype).element_size()
                if end - begin != expected:
                    raise _corrupt(file, f"tensor {name} spans {end - begin} bytes, its shape needs {expected}")
                self._spans[name] = (data_start + begin, end - begin)
        self._fds: dict[Path, int] = {}

    @classmethod
    def from_index(cls, path: Path, index_file: Path) -> SafetensorsReader:
        weight_map = _read_index(index_file)
        files = sorted({path / shard for shard in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(
                    f"{index_file} names shard {f.name}, which is missing from {path}; re-save the checkpoint"
                )
        reader = cls(path, files)
        for name, shard in weight_map.items():
            info = reader._infos.get(name)
            if info is None or info.file.name != shard:
                raise _corrupt(index_file, f"tensor {name} is not in shard {shard}")
        return reader

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def weight_files(self) -> list[Path]:
        return list(self._files)

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def read(self, name: str) -> Tensor:
        info = self._infos.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name} is not stored in {self.path}")
        offset, nbytes = self._spans[name]
        if nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        buffer = bytearray(nbytes)
        view, done = memoryview(buffer), 0
        try:
            while done < nbytes:
                got = os.preadv(self._fd(info.file), [view[done:]], offset + done)
                if got == 0:
                    raise OSError(f"unexpected end of file after {done} of {nbytes} bytes")
                done += got
        except OSError as exc:
            raise _corrupt(info.file, f"reading {name}: {exc}") from None
        return torch.frombuffer(buffer, dtype=torch.uint8).view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class TorchBinReader(CheckpointReader):
    """``pytorch_model.bin`` or shards listed in ``pytorch_model.bin.index.json``, memory-mapped."""

    def __init__(self, path: Path, files: list[Path], weight_map: dict[str, str] | None = None) -> None:
        super().__init__(path)
        self._files = files
        self._loaded: dict[Path, dict[str, Tensor]] = {}
        self._infos: dict[str, TensorInfo] = {}
        for file in files:
            for name, t in self._load(file).items():
                self._infos[name] = TensorInfo(name, tuple(t.shape), t.dtype, file)
        if weight_map is not None:
            for name in weight_map:
                if name not in self._infos:
                    raise CheckpointError(f"the index of {path} names tensor {name}, which no shard holds; re-save it")

    def _load(self, file: Path) -> dict[str, Tensor]:
        if file not in self._loaded:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise _corrupt(file, exc) from None
                logger.info("%s is in the legacy (non-zip) format and cannot be memory-mapped; loading it whole", file)
                state = self._load_unmapped(file)
            except Exception as exc:
                raise _corrupt(file, exc) from None
            if not isinstance(state, dict):
                raise _corrupt(file, f"expected a state dict, found {type(state).__name__}")
            self._loaded[file] = state
        return self._loaded[file]

    @staticmethod
    def _load_unmapped(file: Path) -> dict[str, Tensor]:
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _corrupt(file, exc) from None

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def weight_files(self) -> list[Path]:
        return list(self._files)

    def read(self, name: str) -> Tensor:
        info = self._infos.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name} is not stored in {self.path}")
        return self._load(info.file)[name].clone().contiguous()

    def close(self) -> None:
        self._loaded.clear()


SUPPORTED = f"{SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} with shards, {BIN_SINGLE}, {BIN_INDEX} with shards"


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a model folder in whichever supported format it holds.

    Raises :class:`CheckpointError` naming the folder, what was found and what is supported.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} does not exist or is not a folder; pass the folder that holds config.json and the model weights"
        )
    if (path / SAFETENSORS_INDEX).is_file():
        return SafetensorsReader.from_index(path, path / SAFETENSORS_INDEX)
    if (path / SAFETENSORS_SINGLE).is_file():
        return SafetensorsReader(path, [path / SAFETENSORS_SINGLE])
    if (path / BIN_INDEX).is_file():
        weight_map = _read_index(path / BIN_INDEX)
        files = sorted({path / shard for shard in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path / BIN_INDEX} names missing shard(s) {missing}; re-save the checkpoint")
        return TorchBinReader(path, files, weight_map)
    if (path / BIN_SINGLE).is_file():
        return TorchBinReader(path, [path / BIN_SINGLE])
    found = sorted(p.name for p in path.iterdir())
    raise CheckpointError(
        f"no model weights recognised in {path} (found: {', '.join(found) or 'nothing'}). "
        f"Supported: {SUPPORTED}. Save the model with save_pretrained."
    )
