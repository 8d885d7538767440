"""Writing sharded safetensors one tensor at a time.

``safetensors.torch.save_file`` needs a whole shard in memory (5 GB by default). A merge
knows every output name, shape and dtype before it starts, so all shard boundaries and
headers are computed up front and each shard is written as a stream: 8-byte header length,
JSON header padded with spaces to 8-byte alignment, then the raw bytes of each tensor as it
is produced. Memory is one tensor, and the files are the ones transformers writes. Large tensors
go to the file past the page cache (:mod:`~obim_trainer.checkpoints.direct_write`).

Because the layout is fixed before any data, a merge split between workers (processes or the
ranks of a distributed run) writes the same bytes: each worker's writer is given its ``part``
of the plan and writes those tensors at their places in the shared shard files (each writes
the same header wherever it writes, and sizes the file), and one writes the index at the end.
The layout (:class:`ShardLayout`) is computed once and handed to every worker's writer; the index
comes from it too, so no writer exists just to write it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch
from torch import Tensor

from obim_trainer.checkpoints.direct_write import DirectFile
from obim_trainer.checkpoints.reader import SAFETENSORS_DTYPES
from obim_trainer.errors import ConfigError, OutputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
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
    """Bytes in ``"5GB"`` (5·10⁹), ``"500MB"``, ``"2GiB"`` (2·2³⁰), ``"1e9"`` or ``1000``.

    Decimal and binary units as transformers reads ``max_shard_size``; the unit is not case
    sensitive (``"500mb"`` means bytes, where transformers would read a lowercase b as bits).
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ConfigError(f"cannot read the size {text!r}; write it like 5GB, 500MB or 2GiB")
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise ConfigError(f"cannot read the size {text!r}; write it like 5GB, 500MB or 2GiB")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"a shard size must be positive, got {text!r}; write it like 5GB, 500MB or 2GiB")
    return size


@dataclass(frozen=True)
class _Slot:
    """Where one planned tensor goes: its shard, its absolute byte offset there and its size."""

    shard: int
    offset: int
    nbytes: int


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _check_plan(plan: Sequence[PlanEntry]) -> None:
    if not plan:
        raise ValueError("the write plan is empty; there is nothing to write")
    seen: set[str] = set()
    for name, shape, dtype in plan:
        if name in seen:
            raise ValueError(f"tensor {name} appears twice in the write plan")
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise ValueError(f"tensor {name}: invalid shape {shape}")
        seen.add(name)


def _split(plan: Sequence[PlanEntry], max_shard_size: int) -> list[list[PlanEntry]]:
    """Greedy split in plan order, as ``huggingface_hub.split_torch_state_dict_into_shards`` does.

    A tensor larger than ``max_shard_size`` gets a shard of its own. (The hub moves such a tensor
    ahead of the shard being filled; here that shard ends instead, so shards stay contiguous in
    plan order and only one file is ever open.)
    """
    shards: list[list[PlanEntry]] = []
    size = 0
    for entry in plan:
        nbytes = _nbytes(entry[1], entry[2])
        if not shards or size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _layout(entries: Sequence[PlanEntry], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The header of one shard and each tensor's absolute offset in it.

    Data is laid out by element size, largest first (as safetensors does), and the header is
    padded to a multiple of 8, so every tensor starts at a multiple of its element size and can
    be memory-mapped without copying. Writes still arrive in plan order; each seeks to its slot.
    """
    ordered = sorted(entries, key=lambda e: -e[2].itemsize)
    header: dict[str, object] = {"__metadata__": metadata}
    offsets: dict[str, int] = {}
    position = 0
    for name, shape, dtype in ordered:
        nbytes = _nbytes(shape, dtype)
        offsets_pair = [position, position + nbytes]
        header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": offsets_pair}
        offsets[name] = position
        position += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    return len(raw).to_bytes(8, "little") + raw, {name: start + offset for name, offset in offsets.items()}


def _tensor_bytes(tensor: Tensor) -> memoryview:
    """The tensor's bytes without a copy when it is already a contiguous CPU tensor."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _write_error(file: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {file} ({exc.strerror or exc}); free disk space or choose another output folder")


@dataclass(frozen=True)
class ShardLayout:
    """The whole output fixed before any data: shard files, their headers and sizes, each tensor's slot.

    Picklable, so a parallel merge computes it once and every worker's writer (and the index) uses it.
    """

    folder: Path
    plan: tuple[PlanEntry, ...]
    shard_files: tuple[Path, ...]
    headers: tuple[bytes, ...]
    sizes: tuple[int, ...]
    slots: dict[str, _Slot]

    @classmethod
    def build(
        cls, folder: Path, plan: Sequence[PlanEntry], max_shard_size: int, metadata: dict[str, str] | None = None
    ) -> ShardLayout:
        """The layout of ``plan`` in shards of at most ``max_shard_size`` bytes (see :func:`_split`)."""
        folder = Path(folder)
        metadata = {"format": "pt", **(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"safetensors metadata must map strings to strings, got {metadata!r}")
        if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size <= 0:
            raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
        entries = tuple((name, tuple(shape), dtype) for name, shape, dtype in plan)
        _check_plan(entries)
        shards = _split(entries, max_shard_size)
        n = len(shards)
        files = (
            [folder / SINGLE_FILE]
            if n == 1
            else [folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        headers, sizes, slots = [], [], {}
        for shard, shard_entries in enumerate(shards):
            header, offsets = _layout(shard_entries, metadata)
            headers.append(header)
            sizes.append(len(header) + sum(_nbytes(shape, dtype) for _, shape, dtype in shard_entries))
            for name, shape, dtype in shard_entries:
                slots[name] = _Slot(shard, offsets[name], _nbytes(shape, dtype))
        return cls(folder, entries, tuple(files), tuple(headers), tuple(sizes), slots)

    @property
    def files(self) -> list[Path]:
        """The output's files: shards in order, then the index when there are several."""
        return [*self.shard_files, *([self.folder / INDEX_FILE] if len(self.shard_files) > 1 else [])]

    def write_index(self, *, fsync: bool = True) -> list[Path]:
        """Write ``model.safetensors.index.json`` when there are several shards; return :attr:`files`.

        ``fsync=False`` when the folder is published by
        :func:`~obim_trainer.checkpoints.atomic.atomic_output_dir`, which fsyncs every file before the rename.
        """
        if len(self.shard_files) == 1:
            return self.files
        index = self.folder / INDEX_FILE
        content = {
            "metadata": {
                "total_parameters": sum(math.prod(shape) for _, shape, _ in self.plan),
                "total_size": sum(slot.nbytes for slot in self.slots.values()),
            },
            "weight_map": {name: self.shard_files[slot.shard].name for name, slot in self.slots.items()},
        }
        try:
            with index.open("w", encoding="utf-8") as handle:
                handle.write(json.dumps(content, indent=2, sort_keys=True) + "\n")
                handle.flush()
                if fsync:
                    os.fsync(handle.fileno())
        except OSError as exc:
            raise _write_error(index, exc) from None
        return self.files


class ShardedSafetensorsWriter:
    """Stream tensors, in plan order, into shards of at most ``max_shard_size`` bytes of data.

    One shard is written as ``model.safetensors``; several as ``model-0000i-of-0000N.safetensors``
    plus ``model.safetensors.index.json``, with the names, split and index transformers'
    ``save_pretrained`` would produce for the same tensors in the same order, as long as no tensor
    is larger than ``max_shard_size``. Such a tensor gets a shard of its own in both, but here it
    also ends the shard being filled, so that shards stay contiguous in plan order (one open file);
    ``save_pretrained`` sets it aside and keeps filling (see :func:`_split`). Leaving the
    ``with`` block normally closes the writer; on an exception the partial files stay for the
    caller's atomic output folder to discard.

    ``part`` (names from the plan) makes this writer one of several that share the output: it
    writes only those tensors, in plan order, into files laid out for the whole plan, and the
    index is left to :meth:`ShardLayout.write_index`, called once every part is written.
    ``fsync=False``: the caller's atomic output folder fsyncs every file before publishing it, so
    the writer does not sync each shard a second time.
    """

    def __init__(
        self,
        folder: Path,
        plan: Sequence[PlanEntry],
        max_shard_size: int,
        metadata: dict[str, str] | None = None,
        *,
        part: Collection[str] | None = None,
        fsync: bool = True,
    ) -> None:
        self._init(ShardLayout.build(folder, plan, max_shard_size, metadata), part, fsync)

    @classmethod
    def on_layout(
        cls, layout: ShardLayout, *, part: Collection[str] | None = None, fsync: bool = True
    ) -> ShardedSafetensorsWriter:
        """A writer into a layout computed once for every part (see :class:`ShardLayout`)."""
        writer = cls.__new__(cls)
        writer._init(layout, part, fsync)
        return writer

    def _init(self, layout: ShardLayout, part: Collection[str] | None, fsync: bool) -> None:
        self.layout = layout
        self.folder = layout.folder
        self._fsync = fsync
        self._plan = layout.plan
        self._files = layout.shard_files
        self._headers = layout.headers
        self._sizes = layout.sizes
        self._slots = layout.slots
        self._whole = part is None
        wanted = set(self._slots) if part is None else set(part)
        if not wanted <= set(self._slots):
            raise ValueError(f"part names tensor(s) the plan lacks: {sorted(wanted - set(self._slots))[:5]}")
        self._todo = [entry for entry in self._plan if entry[0] in wanted]
        self._remaining = [0] * len(self._files)
        for name, _, _ in self._todo:
            self._remaining[self._slots[name].shard] += 1
        self._position = 0
        self._handle: BinaryIO | None = None
        self._direct: DirectFile | None = None
        self._closed = False

    @property
    def files(self) -> list[Path]:
        """The output's files: shards in order, then the index when there are several."""
        return self.layout.files

    def _open_shard(self, shard: int) -> BinaryIO:
        """The shard file, created if need be, with its header and its final size (which every part agrees on)."""
        file = self._files[shard]
        try:
            handle = os.fdopen(os.open(file, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
            handle.write(self._headers[shard])
            handle.flush()
            os.ftruncate(handle.fileno(), self._sizes[shard])
            self._direct = DirectFile(file, handle.fileno())
        except OSError as exc:
            raise _write_error(file, exc) from None
        return handle

    def _finish_shard(self, shard: int) -> None:
        assert self._handle is not None
        try:
            self._close_direct()
            self._handle.flush()
            if self._fsync:
                os.fsync(self._handle.fileno())
            self._handle.close()
        except OSError as exc:
            raise _write_error(self._files[shard], exc) from None
        self._handle = None

    def write(self, name: str, tensor: Tensor) -> None:
        """Write the next planned tensor (of this writer's part); its name, shape and dtype must match the plan."""
        if self._closed or self._position >= len(self._todo):
            raise ValueError(f"tensor {name} was not planned: all {len(self._todo)} planned tensors are written")
        p_name, p_shape, p_dtype = self._todo[self._position]
        if name != p_name or tuple(tensor.shape) != p_shape or tensor.dtype != p_dtype:
            raise ValueError(
                f"expected tensor {p_name} {p_shape} {p_dtype} next, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        slot = self._slots[name]
        if self._handle is None:
            self._handle = self._open_shard(slot.shard)
        try:
            assert self._direct is not None
            self._direct.write_at(slot.offset, _tensor_bytes(tensor))
        except OSError as exc:
            raise _write_error(self._files[slot.shard], exc) from None
        self._position += 1
        self._remaining[slot.shard] -= 1
        if self._remaining[slot.shard] == 0:
            self._finish_shard(slot.shard)

    def _close_direct(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    def close(self) -> list[Path]:
        """Check every planned tensor (of this writer's part) was written and, for the whole plan, write
        the index; return :attr:`files`. Every shard is fsynced when its last tensor is written (unless
        ``fsync=False``).
        Calling it again is harmless."""
        if self._closed:
            return self.files
        if self._position != len(self._todo):
            missing = len(self._todo) - self._position
            raise ValueError(f"{missing} planned tensor(s) were not written, first: {self._todo[self._position][0]}")
        if self._whole:
            self.write_index()
        self._closed = True
        return self.files

    def write_index(self) -> list[Path]:
        """Write the index of the whole plan (see :meth:`ShardLayout.write_index`); return :attr:`files`."""
        return self.layout.write_index(fsync=self._fsync)

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                self.close()
        finally:  # on failure the partial files stay for the caller's atomic output folder to discard
            self._close_direct()
            if self._handle is not None:
                self._handle.close()
                self._handle = None
