"""A statistics file read one tensor at a time: how Grams and Fisher diagonals reach the merge.

A 7B model's Grams or Fisher diagonals are tens of GB, more than the merge may hold. They are
written once as safetensors and read back per tensor (``safe_open`` maps the file; a row range
reads only those rows), so the merge holds one tensor's statistics at a time. The handle is a
path and a little metadata: it pickles to the workers of a parallel merge, which open the file
themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from obim_trainer.checkpoints.atomic import write_atomically
from obim_trainer.errors import CalibrationError


def write_stats_file(path: Path, tensors: dict[str, Tensor], key: str, kind: str, metadata: dict[str, Any]) -> None:
    """Write ``tensors`` (on the CPU, contiguous) atomically with the key, kind and JSON-encoded ``metadata``."""
    from safetensors.torch import save

    header = {name: json.dumps(value) for name, value in metadata.items()}
    header.update({"key": key, "kind": kind})
    write_atomically(Path(path), save(tensors, metadata=header))


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
