"""What a merged folder says about itself: ``obim_merge.json`` and a short model card.

A merged model is only trustworthy if it can be reproduced: the manifest records the
method and every parameter, the inputs with sizes and fingerprints, where the
activation statistics came from, library versions and timings.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import obim_trainer
from obim_trainer._user_cache import installed_version
from obim_trainer.checkpoints import CheckpointReader

MANIFEST_NAME = "obim_merge.json"


def _versions() -> dict[str, str]:
    return {
        "obim_trainer": obim_trainer.__version__,
        **{name: installed_version(name) for name in ("torch", "transformers", "safetensors")},
        "python": platform.python_version(),
    }


def describe_input(reader: CheckpointReader) -> dict[str, Any]:
    """A checkpoint's path, format, weight files with sizes, and its fingerprint."""
    files = reader.weight_files()
    return {
        "path": str(reader.path.resolve()),
        "format": reader.format,
        "files": [{"name": f.name, "size": f.stat().st_size} for f in files],
        "size": sum(f.stat().st_size for f in files),
        "fingerprint": reader.fingerprint(),
    }


@dataclass
class MergeManifest:
    """Everything recorded in ``obim_merge.json``."""

    method: dict[str, Any]
    seed: int
    base: dict[str, Any]
    checkpoints: list[dict[str, Any]]
    output: dict[str, Any]
    calibration: dict[str, Any] | None = None
    statistics: list[dict[str, Any]] = field(default_factory=list)
    ownership_share: list[float] | None = None
    """Of the positions the checkpoints took, the part each took (sums to 1)."""
    base_share: float | None = None
    """Part of the owned tensors' positions the base kept (a total share Σ n_k below 1)."""
    notes: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)
    """Which path iterative merging's selection took: native loops (and which library) or torch (and why)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "method": self.method,
            "seed": self.seed,
            "base": self.base,
            "checkpoints": self.checkpoints,
            "calibration": self.calibration,
            "statistics": self.statistics,
            "ownership_share": self.ownership_share,
            "base_share": self.base_share,
            "notes": self.notes,
            "output": self.output,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "kernels": self.kernels,
            "versions": _versions(),
        }

    def write(self, folder: Path) -> dict[str, Any]:
        data = self.to_dict()
        (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
        (folder / "README.md").write_text(model_card(data))
        return data


def _shares_line(ownership_share: list[float], base_share: float) -> str:
    """The positions as merged: the base's part, then each checkpoint's part of all positions."""
    taken = ", ".join(f"{s * (1.0 - base_share):.1%}" for s in ownership_share)
    return (
        f"Positions of the merged tensors: the base keeps {base_share:.1%}; taken from each checkpoint, "
        f"in merge order: {taken}."
    )


def model_card(data: dict[str, Any]) -> str:
    """A short model card: what was merged, how, and how to reproduce it."""
    method = data["method"]
    params = {k: v for k, v in method.items() if k != "method"}
    lines = [
        "---",
        "tags: [merge, obim-trainer]",
        "---",
        f"# Merged with obim-trainer ({method['method']})",
        "",
        f"Base: `{data['base']['path']}`",
        "",
        "Checkpoints, in merge order:",
        *(f"{i + 1}. `{c['path']}`" for i, c in enumerate(data["checkpoints"])),
        "",
        f"Parameters: `{json.dumps(params)}`, seed {data['seed']}.",
    ]
    if data.get("ownership_share"):
        lines += ["", _shares_line(data["ownership_share"], data.get("base_share") or 0.0)]
    lines += [
        "",
        "OBIM: Optimal Brain Iterative Merging (arXiv 2502.12217). Full record: `obim_merge.json`.",
        "",
    ]
    return "\n".join(lines)
