"""Read back what an offline W&B run recorded: history rows from ``run-*.wandb`` and logged tables.

The run file is a LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks of records
with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) of ``wandb_internal_pb2.Record``
protos; this wandb release ships no reader for it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> list[bytes]:
    ident, _magic, _version = HEADER.unpack_from(data)
    assert ident == b":W&B", f"not a W&B run file (starts with {data[:4]!r})"
    records, pending, pos = [], b"", HEADER.size
    while pos + RECORD_HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER.size:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        pos += RECORD_HEADER.size
        if kind == 0 and length == 0:
            pos += left - RECORD_HEADER.size
            continue
        chunk, pos = data[pos : pos + length], pos + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    return records


def fresh_wandb() -> None:
    """Close a run an earlier test left open and drop the settings wandb cached then (its mode, its dir)."""
    import wandb

    wandb.finish()
    wandb.teardown()


def run_dir(wandb_dir: Path) -> Path:
    """The one offline run under ``wandb_dir``, once its run file is complete.

    ``run.finish()`` can return before wandb's service has written the last records (about one
    run in ten here), so the service is shut down first: it flushes and closes the file on the way.
    """
    import wandb

    wandb.teardown()
    runs = sorted(Path(wandb_dir).glob("wandb/offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {wandb_dir}, found {runs}"
    return runs[0]


def history(run: Path) -> list[dict[str, Any]]:
    """Every ``run.log`` row, with nested keys joined by '/' and values decoded from JSON."""
    from wandb.proto import wandb_internal_pb2 as pb

    (run_file,) = run.glob("run-*.wandb")
    rows = []
    for chunk in _chunks(run_file.read_bytes()):
        record = pb.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def table(run: Path, key: str, row: dict[str, Any]) -> dict[str, Any]:
    """The JSON of the table logged under ``key`` in history ``row``."""
    return json.loads((run / "files" / row[f"{key}/path"]).read_text())
