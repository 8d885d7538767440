"""A statistics file written and read one tensor at a time: how Grams and Fisher diagonals reach the merge.

A 7B model's Grams or Fisher diagonals are tens of GB, more than the merge may hold. They are
written as safetensors by :class:`StatsFileWriter`, one tensor at a time as they are produced (the
header, which needs every name and offset, goes last into room reserved at the start; safetensors
allows a header padded with spaces), and read back per tensor (``safe_open`` maps the file; a row
range reads only those rows), so neither side holds more than one tensor's statistics. The handle
is a path and a little metadata: it pickles to the workers of a parallel merge, which open the file
themselves.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from obim_trainer.checkpoints.atomic import atomic_output_file, rename_durably
from obim_trainer.checkpoints.reader import SAFETENSORS_DTYPES
from obim_trainer.errors import CalibrationError

logger = logging.getLogger(__name__)

_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
KEY_PLACEHOLDER = "0" * 64
"""The key of a file written before its key is known; :func:`set_stats_key` replaces it in place (same length)."""


def _metadata_header(key: str, kind: str, metadata: Mapping[str, Any]) -> dict[str, str]:
    header = {name: json.dumps(value) for name, value in metadata.items()}
    header.update({"key": key, "kind": kind})
    return header


def _header_json(entries: Mapping[str, dict[str, Any]], metadata: dict[str, str]) -> bytes:
    return json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()


def header_room(tensors: Mapping[str, tuple[int, ...]], metadata: Mapping[str, Any], kind: str) -> int:
    """Bytes of the header of a file holding at most ``tensors`` (name → shape) with ``metadata`` no larger than
    the given one: what :class:`StatsFileWriter` reserves when the header is only known at the end."""
    worst = {
        name: {"dtype": "F64", "shape": list(shape), "data_offsets": [2**63, 2**63]} for name, shape in tensors.items()
    }
    return len(_header_json(worst, _metadata_header(KEY_PLACEHOLDER, kind, metadata)))


class StatsFileWriter:
    """Streams tensors into a statistics file, one at a time; :meth:`finish` writes the header and publishes it.

    The data goes into a temporary file beside ``path`` (:func:`~obim_trainer.checkpoints.atomic.atomic_output_file`)
    after ``header_bytes`` reserved for the header (:func:`header_room`); nothing is at ``path`` until
    :meth:`finish` publishes the fsynced file there, so a failure or an interrupt leaves no partial
    statistics. Memory: the tensor being written.
    """

    def __init__(self, path: Path, header_bytes: int) -> None:
        self.path = Path(path)
        self._open(header_bytes + (-header_bytes % 8))  # data 8-byte aligned, so it maps without a copy
        self._entries: dict[str, dict[str, Any]] = {}
        self._position = 0

    def add(self, name: str, tensor: Tensor) -> None:
        """Append one tensor (any device; written as it is, contiguous)."""
        if name in self._entries:
            raise ValueError(f"statistics tensor {name} written twice")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        data = memoryview(flat.view(torch.uint8).numpy())
        self._file.write(data)
        end = self._position + len(data)
        self._entries[name] = {
            "dtype": _DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._position, end],
        }
        self._position = end

    def finish(self, key: str, kind: str, metadata: Mapping[str, Any]) -> StatsFile:
        """Write the header (key, kind, JSON-encoded ``metadata``) into the reserved room, fsync, rename to ``path``."""
        header = _header_json(self._entries, _metadata_header(key, kind, metadata))
        if len(header) > self._room:
            self._grow_room(len(header))
        self._file.seek(0)
        self._file.write(self._room.to_bytes(8, "little") + header + b" " * (self._room - len(header)))
        self._file.close()
        self._publish.close()  # fsynced and renamed into place
        return StatsFile(self.path, kind, dict(metadata))

    def _open(self, room: int) -> None:
        """A new temporary file with ``room`` bytes for the header, positioned where the data starts."""
        self._publish = ExitStack()
        partial = self._publish.enter_context(atomic_output_file(self.path))
        self._file = open(partial, "w+b")  # noqa: SIM115 (closed by finish or abort)
        self._room = room
        self._file.seek(8 + room)

    def _grow_room(self, needed: int) -> None:
        """Move the data behind a larger header room (a copy on disk; only when the reservation was too small)."""
        logger.info(
            "the header of %s needs %d bytes, %d were reserved; rewriting the data", self.path, needed, self._room
        )
        old, old_room, old_publish = self._file, self._room, self._publish
        self._open(needed + (-needed % 8))
        old.seek(8 + old_room)
        shutil.copyfileobj(old, self._file, 16 << 20)
        old.close()
        _drop(old_publish)

    def abort(self) -> None:
        """Drop what was written (nothing appears at ``path``)."""
        self._file.close()
        _drop(self._publish)

    def __enter__(self) -> StatsFileWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is not None and not self._file.closed:
            self.abort()


class _Dropped(Exception):
    """Thrown into an unpublished temporary file's context: it is deleted, nothing appears."""


def _drop(publish: ExitStack) -> None:
    publish.__exit__(_Dropped, _Dropped(), None)


def write_stats_file(path: Path, tensors: Mapping[str, Tensor], key: str, kind: str, metadata: dict[str, Any]) -> None:
    """Write ``tensors`` with the key, kind and JSON-encoded ``metadata``, one at a time and atomically."""
    room = header_room({name: tuple(t.shape) for name, t in tensors.items()}, metadata, kind)
    with StatsFileWriter(path, room) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.finish(key, kind, metadata)


def set_stats_key(path: Path, key: str) -> None:
    """Replace the key of a file written by :class:`StatsFileWriter` in place, within the room its header was
    given (fsynced; only the header is rewritten)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
            header["__metadata__"]["key"] = key
        except (ValueError, KeyError, TypeError):
            raise CalibrationError(f"statistics file {path} is unreadable; delete it to recompute") from None
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > size:
            raise CalibrationError(f"the key {key!r} does not fit the header of {path}; use a shorter key")
        f.seek(8)
        f.write(raw + b" " * (size - len(raw)))
        f.flush()
        os.fsync(f.fileno())


def move_stats_file(source: Path, target: Path) -> None:
    """Move a finished statistics file to ``target`` atomically: a rename where possible, else a streamed copy
    into a temporary file beside ``target``, fsynced, renamed, and the source removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        rename_durably(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # another filesystem: copy
            raise
        with atomic_output_file(target) as partial, open(partial, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, 16 << 20)
        source.unlink()


@dataclass
class StatsFile:
    """A written statistics file: its path, kind and metadata; tensors are read on demand."""

    path: Path
    kind: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, kind: str, expected_key: str | None = None) -> StatsFile:
        """The file's header, checked: :class:`CalibrationError` if unreadable, of another kind or another key."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = dict(f.metadata() or {})
            # activation statistics (ActivationStats.save) are the one kind whose files name none
            stored_kind, key = header.pop("kind", "activations"), header.pop("key")
            metadata = {name: json.loads(value) for name, value in header.items()}
        except Exception as exc:
            raise CalibrationError(f"statistics file {path} is unreadable ({exc}); delete it to recompute") from None
        if stored_kind != kind:
            raise CalibrationError(f"statistics file {path} holds {stored_kind}, not {kind}; delete it to recompute")
        if expected_key is not None and key != expected_key:
            raise CalibrationError(f"statistics file {path} was computed for other inputs (key mismatch)")
        return cls(Path(path), kind, metadata)

    def read(self, name: str, rows: slice | None = None) -> Tensor:
        """One stored tensor (only ``rows`` of it when given), on the CPU as stored."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                return f.get_slice(name)[rows] if rows is not None else f.get_tensor(name)
        except Exception as exc:
            raise CalibrationError(
                f"cannot read {name} from the statistics file {self.path} ({exc}); delete it to recompute"
            ) from None
