"""Every method's merge of the shared fixtures, byte for byte, against a record kept in ``tests/data``.

Why: refactors of the settings, the pipeline or the layout must not change a single merged byte.
The record holds the sha256 of every output tensor (name, dtype, shape and bytes) for each case below.
Regenerate it only for an intended change of the merge math::

    OBIM_RECORD_MERGE_BYTES=1 python -m pytest tests/test_merge_bytes.py

Floating-point kernels differ between CPUs (torch's by instruction set, the BLAS by vendor as well: the same
AVX512 record failed for 7 of 27 cases on an Intel Xeon after passing on an AMD EPYC), so the record keeps the
hashes per platform (capability/vendor). On a platform it has not seen, a case is checked where every recorded
platform agrees on its bytes and skipped, with the reason, where they differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from obim_trainer.merging.registry import available_methods
from obim_trainer.pipeline.merge import merge_checkpoints

RECORD = Path(__file__).parent / "data" / "merge_bytes.json"
RECORDING = os.environ.get("OBIM_RECORD_MERGE_BYTES") == "1"

# (case name, fixture, method, params); every registered method appears at least once.
_EXTRA_CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("obim@0.3", "llama_family", "obim", {"ratios": [0.1, 0.1, 0.1]}),
    ("regmean-non-sequential", "llama_family", "regmean", {"sequential": False}),
    ("regmean-mixed", "llama_family", "regmean", {"sequential": False, "statistics": "mixed"}),
    ("obim-gpt2", "gpt2_family", "obim", {}),
    ("obim-tied-bf16", "llama_tied_bf16_family", "obim", {}),
    ("ties-gpt2", "gpt2_family", "ties", {}),
    ("regmean-gpt2", "gpt2_family", "regmean", {}),
]
_ONE_CHECKPOINT = {"slerp"}


def _cases() -> list[tuple[str, str, str, dict[str, Any]]]:
    cases = [(name, "llama_family", name, {}) for name in available_methods()]
    return cases + _EXTRA_CASES


def tensor_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each tensor in a model folder's safetensors files, over name, dtype, shape and bytes."""
    hashes = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, tensor in load_file(file).items():
            digest = hashlib.sha256(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
            hashes[name] = digest.hexdigest()
    return dict(sorted(hashes.items()))


def platform_key() -> str:
    """The CPU the bytes depend on: torch's kernel capability and the vendor (the BLAS dispatches on it)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    vendor = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), platform.machine())
    return f"{torch.backends.cpu.get_cpu_capability()}/{vendor}"


def _record() -> dict[str, Any]:
    if RECORD.exists():
        return json.loads(RECORD.read_text())
    return {"platforms": {}}


def expected_hashes(record: dict[str, Any], case: str) -> dict[str, str]:
    """The recorded hashes of a case on this platform; skips the test where they depend on the platform and
    this one has no record."""
    platforms, here = record["platforms"], platform_key()
    if here in platforms:
        assert case in platforms[here], f"no record for {case}: regenerate with OBIM_RECORD_MERGE_BYTES=1"
        return platforms[here][case]
    seen = [hashes[case] for hashes in platforms.values() if case in hashes]
    assert seen, f"no record for {case}: regenerate with OBIM_RECORD_MERGE_BYTES=1"
    if any(hashes != seen[0] for hashes in seen):
        pytest.skip(f"{case}'s bytes differ between the recorded CPUs {sorted(platforms)}; this is {here}")
    return seen[0]


@pytest.fixture(scope="module")
def record():
    data = _record()
    yield data
    if RECORDING:
        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize(("case", "fixture", "method", "params"), _cases(), ids=[c[0] for c in _cases()])
def test_merge_bytes_match_the_record(case, fixture, method, params, request, language_files, record, tmp_path):
    base, ckpts = request.getfixturevalue(fixture)
    if method in _ONE_CHECKPOINT:
        ckpts = ckpts[:1]
    merge_checkpoints(
        base=base,
        checkpoints=ckpts,
        output=tmp_path / "merged",
        method=method,
        params=params,
        calibration_data=language_files,
        new_languages=["zh"],
        calibration_samples=12,
        calibration_max_length=32,
        stats_cache_dir=tmp_path / "cache",
        progress=False,
    )
    hashes = tensor_hashes(tmp_path / "merged")
    if RECORDING:
        record["platforms"].setdefault(platform_key(), {})[case] = hashes
        return
    expected = expected_hashes(record, case)
    assert list(hashes) == list(expected)
    changed = [name for name in hashes if hashes[name] != expected[name]]
    assert not changed, f"{case}: {len(changed)} tensor(s) changed, e.g. {changed[:3]}"
