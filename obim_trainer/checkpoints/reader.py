"""Reading model folders tensor by tensor.

A merge touches every tensor of K+1 models; holding one model, let alone K, is not an
option at 7B×4 on 24 GB. Readers therefore parse headers once and serve one tensor at a
time. Safetensors files are read with plain positioned reads into a buffer the returned
tensor owns, rather than through ``safe_open``'s memory map: the mapped pages of every input
would otherwise stay resident (and count in the process's RSS) for as long as the files are
open. ``.bin`` files go through ``torch.load(mmap=True, weights_only=True)``, which is the only
lazy way to read them.

Corruption is caught at open time where it is cheap (header syntax, offsets, file sizes,
index against shards), so a bad checkpoint fails before any output is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import torch
from torch import Tensor

from obim_trainer.errors import CheckpointError

logger = logging.getLogger(__name__)

FINGERPRINT_EDGE = 64 * 1024
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
_ZIP_MAGIC = b"PK\x03\x04"

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
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

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class CheckpointReader(ABC):
    """One model folder, read one tensor at a time."""

    format: str = "unknown"
    """The format name :func:`~obim_trainer.checkpoints.detect.detect_format` gives it (for the manifest)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @abstractmethod
    def tensor_infos(self) -> dict[str, TensorInfo]:
        """Every stored tensor, in file order (files in name order, tensors in storage order)."""

    @abstractmethod
    def read(self, name: str) -> Tensor:
        """One tensor in its stored dtype, on the CPU, contiguous, owning its memory."""

    def read_into(self, name: str, allocate: Callable[[int], Tensor]) -> Tensor:
        """:meth:`read`, into the bytes ``allocate(nbytes)`` returns where the format stores tensors as raw bytes.

        A caller that recycles buffers (see :class:`~obim_trainer.checkpoints.read_buffers.ReadBuffers`)
        saves the page faults of fresh memory, which cost more than the copy from the page cache.
        Formats that decode or compute their tensors ignore ``allocate``.
        """
        return self.read(name)

    @abstractmethod
    def weight_files(self) -> list[Path]:
        """The files holding the weights."""

    def fingerprint(self) -> str:
        """A cheap, change-detecting fingerprint of the weight files — not a content hash.

        sha256 over each weight file's name, size, modification time and first and last 64 KiB
        (which hold the safetensors header and the last tensors). Re-saving a checkpoint changes
        it; so does touching or copying a file (which costs a recomputation of cached statistics,
        never a stale reuse). Hashing whole multi-GB files would cost minutes per merge.
        """
        digest = hashlib.sha256()
        for file in sorted(self.weight_files()):
            try:
                stat = file.stat()
                digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
                with file.open("rb") as handle:
                    digest.update(handle.read(FINGERPRINT_EDGE))
                    if stat.st_size > FINGERPRINT_EDGE:
                        handle.seek(max(FINGERPRINT_EDGE, stat.st_size - FINGERPRINT_EDGE))
                        digest.update(handle.read(FINGERPRINT_EDGE))
            except OSError as exc:
                raise _unreadable(file, exc) from None
        return digest.hexdigest()

    def _info(self, name: str) -> TensorInfo:
        info = self.tensor_infos().get(name)
        if info is None:
            raise CheckpointError(
                f"tensor {name} is not stored in {self.path}; check the name against the checkpoint's "
                "weight files (all inputs must have the same architecture)"
            )
        return info

    def close(self) -> None:  # noqa: B027 - a reader without handles has nothing to release
        """Release file handles and memory maps."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def _corrupt(file: Path, detail: object) -> CheckpointError:
    return CheckpointError(f"{file} is corrupt or truncated ({detail}); re-save or re-download it")


def _unreadable(file: Path, exc: OSError) -> CheckpointError:
    return CheckpointError(f"cannot read {file} ({exc.strerror or exc}); check that it exists and is readable")


def _read_index(index_file: Path) -> dict[str, str]:
    """The ``weight_map`` of a transformers index file: tensor name → shard file name."""
    try:
        content = json.loads(index_file.read_text())
    except OSError as exc:
        raise _unreadable(index_file, exc) from None
    except ValueError as exc:
        raise _corrupt(index_file, f"not valid JSON: {exc}") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _corrupt(index_file, "no weight_map, or an empty one")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise _corrupt(index_file, "the weight_map must map tensor names to shard file names")
    return weight_map


def _shards_of(folder: Path, index_file: Path, weight_map: dict[str, str]) -> list[Path]:
    files = sorted({folder / shard for shard in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{index_file} names shard(s) {', '.join(missing)} that are missing from {folder}; "
            "download or copy the missing shards, or re-save the checkpoint"
        )
    return files


def _check_index_matches(index_file: Path, weight_map: dict[str, str], infos: dict[str, TensorInfo]) -> None:
    for name, shard in weight_map.items():
        info = infos.get(name)
        if info is None or info.file.name != Path(shard).name:
            where = "no shard" if info is None else info.file.name
            raise _corrupt(index_file, f"it puts tensor {name} in {shard}, but {where} holds it")


def _tensor_entry(file: Path, name: str, meta: Any) -> tuple[int, int, TensorInfo]:
    """Validate one header entry; return its data offsets and its description."""
    try:
        code, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise _corrupt(file, f"malformed header entry for tensor {name}: {meta!r}") from None
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and d >= 0 for d in shape)
        and all(isinstance(o, int) and o >= 0 for o in (begin, end))
    ):
        raise _corrupt(file, f"malformed shape or offsets for tensor {name}: {meta!r}")
    dtype = SAFETENSORS_DTYPES.get(code)
    if dtype is None:
        raise CheckpointError(
            f"tensor {name} in {file} has dtype {code!r}, which cannot be merged (supported: "
            f"{', '.join(SAFETENSORS_DTYPES)}); convert the checkpoint to bfloat16, float16 or float32"
        )
    info = TensorInfo(name, tuple(shape), dtype, file)
    if end - begin != info.nbytes:
        raise _corrupt(file, f"tensor {name} spans {end - begin} bytes but its shape and dtype need {info.nbytes}")
    return begin, end, info


def _safetensors_header(file: Path) -> list[tuple[TensorInfo, int]]:
    """Parse and check a safetensors header against the file; return each tensor with the
    absolute offset of its data, in file order.

    The checks are those ``safetensors`` makes before it reads anything (offsets contiguous
    from 0 and covering the data exactly), plus the file size, so that a truncated download
    fails here and not halfway through a merge.
    """
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(file, f"{size} bytes, too short for the 8-byte header length")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise _corrupt(file, f"it announces a {header_len}-byte header but holds {size} bytes in all")
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise _unreadable(file, exc) from None
    except ValueError as exc:  # JSON and UTF-8 decoding errors
        raise _corrupt(file, f"the header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _corrupt(file, "the header is not a JSON object")
    entries = sorted(
        (_tensor_entry(file, name, meta) for name, meta in header.items() if name != "__metadata__"),
        key=lambda entry: (entry[0], entry[1]),
    )
    position = 0
    for begin, end, info in entries:
        if begin != position:
            raise _corrupt(file, f"tensor {info.name} starts at data byte {begin}, expected {position}")
        position = end
    data_size = size - 8 - header_len
    if position != data_size:
        raise _corrupt(file, f"the header describes {position} bytes of tensor data but the file holds {data_size}")
    return [(info, 8 + header_len + begin) for begin, _, info in entries]


class SafetensorsReader(CheckpointReader):
    """``model.safetensors``, the shards listed in ``model.safetensors.index.json``, or one
    other safetensors file. Headers are parsed at open; data is read per tensor."""

    format = "safetensors"

    def __init__(self, path: Path, files: Sequence[Path]) -> None:
        super().__init__(path)
        self._files = list(files)
        self._infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, int] = {}
        self._handles: dict[Path, BinaryIO] = {}
        for file in self._files:
            for info, offset in _safetensors_header(file):
                if info.name in self._infos:
                    raise CheckpointError(
                        f"tensor {info.name} is stored twice in {path}, in {self._infos[info.name].file.name} "
                        f"and {file.name}; re-save the checkpoint"
                    )
                self._infos[info.name] = info
                self._offsets[info.name] = offset

    @classmethod
    def from_index(cls, path: Path, index_file: Path) -> SafetensorsReader:
        weight_map = _read_index(index_file)
        reader = cls(path, _shards_of(path, index_file, weight_map))
        _check_index_matches(index_file, weight_map, reader._infos)
        return reader

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def weight_files(self) -> list[Path]:
        return list(self._files)

    def _handle(self, file: Path) -> BinaryIO:
        if file not in self._handles:
            self._handles[file] = file.open("rb", buffering=0)  # unbuffered: readinto goes straight to the tensor
        return self._handles[file]

    def read(self, name: str) -> Tensor:
        return self.read_into(name, _fresh_bytes)

    def read_into(self, name: str, allocate: Callable[[int], Tensor]) -> Tensor:
        info = self._info(name)
        data = allocate(info.nbytes)
        view, done = memoryview(data.numpy()), 0
        try:
            handle = self._handle(info.file)
            handle.seek(self._offsets[name])
            while done < info.nbytes:
                got = handle.readinto(view[done:])
                if not got:
                    raise _corrupt(info.file, f"it ended {done} bytes into tensor {name}; did it change while open?")
                done += got
        except OSError as exc:
            raise _unreadable(info.file, exc) from None
        return data.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _fresh_bytes(nbytes: int) -> Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def _is_zip(file: Path) -> bool:
    try:
        with file.open("rb") as handle:
            return handle.read(4) == _ZIP_MAGIC
    except OSError as exc:
        raise _unreadable(file, exc) from None


def _torch_load(file: Path, mmap: bool) -> dict[str, Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file} holds Python objects besides tensors, which are not loaded for safety "
            f"({str(exc).splitlines()[0]}); re-save the model with save_pretrained (safetensors)"
        ) from None
    except Exception as exc:  # torch reports corrupt archives as RuntimeError, EOFError, ...
        raise _corrupt(file, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        found = type(state).__name__ if not isinstance(state, dict) else "a dict with non-tensor values"
        raise CheckpointError(
            f"{file} holds {found}, not a state dict of tensors (a training checkpoint wrapping the "
            "weights?); save the model itself with save_pretrained"
        )
    return state


class TorchBinReader(CheckpointReader):
    """``pytorch_model.bin`` or the shards listed in ``pytorch_model.bin.index.json``.

    Zip-format files (torch ≥ 1.6) are memory-mapped, so a tensor costs only the pages it
    occupies. Legacy (pre-zip) files cannot be mapped and are loaded whole, one file at a time.
    """

    format = "bin"

    def __init__(self, path: Path, files: Sequence[Path]) -> None:
        super().__init__(path)
        self._files = list(files)
        self._mapped: dict[Path, dict[str, Tensor]] = {}
        self._resident: tuple[Path, dict[str, Tensor]] | None = None
        self._infos: dict[str, TensorInfo] = {}
        for file in self._files:
            for name, tensor in self._state(file).items():
                if name in self._infos:
                    raise CheckpointError(
                        f"tensor {name} is stored twice in {path}, in {self._infos[name].file.name} and "
                        f"{file.name}; re-save the checkpoint"
                    )
                self._infos[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype, file)

    @classmethod
    def from_index(cls, path: Path, index_file: Path) -> TorchBinReader:
        weight_map = _read_index(index_file)
        reader = cls(path, _shards_of(path, index_file, weight_map))
        _check_index_matches(index_file, weight_map, reader._infos)
        return reader

    def _state(self, file: Path) -> dict[str, Tensor]:
        if file in self._mapped:
            return self._mapped[file]
        if self._resident is not None and self._resident[0] == file:
            return self._resident[1]
        if _is_zip(file):
            self._mapped[file] = _torch_load(file, mmap=True)
            return self._mapped[file]
        logger.info("%s is in the legacy (pre-zip) torch format and cannot be memory-mapped; loading it whole", file)
        self._resident = None  # at most one unmapped file in memory
        self._resident = (file, _torch_load(file, mmap=False))
        return self._resident[1]

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def weight_files(self) -> list[Path]:
        return list(self._files)

    def read(self, name: str) -> Tensor:
        info = self._info(name)
        return self._state(info.file)[name].clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        self._mapped.clear()
        self._resident = None
