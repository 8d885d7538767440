"""A sweep of V variants reads each input tensor once and writes the bytes V separate merges write; shards are
fsynced once."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import ClassVar

import pytest

from obim_trainer.checkpoints import dispatch
from obim_trainer.checkpoints.reader import SafetensorsReader
from obim_trainer.pipeline.merge import merge_checkpoints
from obim_trainer.pipeline.variants import MergeSpec, merge_variants, plan_specs, plan_variants
from obim_trainer.settings.merge import MergeConfig
from tests.conftest import make_texts, write_jsonl


def model_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("model")}


@pytest.fixture(scope="module")
def language_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sweep_languages")
    return {
        "en": write_jsonl(folder / "en.jsonl", make_texts(12, seed=41, min_words=8)),
        "zh": write_jsonl(folder / "zh.jsonl", make_texts(12, seed=42, min_words=8)),
    }


def test_a_sweep_writes_the_bytes_of_separate_merges(llama_family, language_files, tmp_path):
    """Activations (OBIM at two total shares), no statistics (TIES), Grams (RegMean per tensor) and a model-level
    merge (sequential RegMean) in one sweep split between two workers, against one-worker merges one by one."""
    base, ckpts = llama_family
    config = MergeConfig.build(
        {
            "base": base,
            "checkpoints": ckpts,
            "calibration_data": language_files,
            "new_languages": ["zh"],
            "calibration_samples": 12,
            "calibration_max_length": 32,
            "stats_cache_dir": tmp_path / "cache",
            "out_shard_size": "100KB",
            "output": tmp_path / "unused",  # each variant gets its own
            "progress": False,
        }
    )
    specs = [
        MergeSpec(method="obim", total_shares=[1.0, 0.3]),
        MergeSpec(method="ties"),
        MergeSpec(method="regmean", label="regmean-parallel", params={"sequential": False}),
    ]
    variants = plan_specs(specs, len(ckpts))
    folders = merge_variants(config.model_copy(update={"workers": 2}), variants, tmp_path / "sweep")
    assert list(folders) == ["obim", "obim@0.3", "ties", "regmean-parallel"]
    for variant in variants:
        alone = tmp_path / "alone" / variant.name
        merge_checkpoints(config, method=variant.method, params=variant.params, output=alone)
        swept = model_files(folders[variant.name])
        assert len(swept) > 2, "several shards and the index"
        assert swept == model_files(alone), variant.name
        manifests = [json.loads((f / "obim_merge.json").read_text()) for f in (folders[variant.name], alone)]
        assert manifests[0]["ownership_share"] == manifests[1]["ownership_share"]
        assert manifests[0]["method"] == manifests[1]["method"]


class CountingReader(SafetensorsReader):
    """The real safetensors reader, counting the folders it opens and the tensors it reads."""

    opened: ClassVar[Counter[Path]] = Counter()
    reads: ClassVar[Counter[tuple[Path, str]]] = Counter()

    def __init__(self, path: Path, files: list[Path]) -> None:
        super().__init__(path, files)
        CountingReader.opened[Path(path)] += 1

    def read_into(self, name, allocate):
        CountingReader.reads[(Path(self.path), name)] += 1
        return super().read_into(name, allocate)


def test_a_three_variant_sweep_opens_its_inputs_once_and_reads_each_tensor_once(
    llama_family, calibration_jsonl, tmp_path, monkeypatch
):
    base, ckpts = llama_family
    config = MergeConfig.build(
        {
            "base": base,
            "checkpoints": ckpts,
            "calibration_data": calibration_jsonl,
            "stats_cache_dir": tmp_path / "cache",
            "output": tmp_path / "statistics",
            "progress": False,
        }
    )
    merge_checkpoints(config)  # the activation statistics, into the cache
    monkeypatch.setattr(dispatch, "SafetensorsReader", CountingReader)
    CountingReader.opened.clear()
    CountingReader.reads.clear()
    variants = plan_variants(["obim", "ties"], {}, [1.0, 0.6], num_models=len(ckpts))
    assert len(variants) == 3
    merge_variants(config, variants, tmp_path / "sweep")
    folders = [Path(base), *map(Path, ckpts)]
    assert CountingReader.opened == Counter(folders), "each input folder opened once"
    names = list(SafetensorsReader(Path(base), [Path(base) / "model.safetensors"]).tensor_infos())
    assert CountingReader.reads == Counter({(f, n): 1 for f in folders for n in names}), "each tensor read once"


def test_every_output_file_is_fsynced_once(llama_family, tmp_path, monkeypatch):
    """The writer leaves the fsync to the atomic output folder, which syncs every file before the rename."""
    synced: Counter[str] = Counter()
    fsync = os.fsync

    out = tmp_path / "merged"

    def counting_fsync(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if target.is_file() and target.parent.name.startswith(f".{out.name}.tmp-"):  # the output's temporary folder
            synced[target.name] += 1
        fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    base, ckpts = llama_family
    merge_checkpoints(base=base, checkpoints=ckpts, method="ties", output=out, out_shard_size="100KB", progress=False)
    written = sorted(p.name for p in out.iterdir() if p.is_file())
    assert sum(name.endswith(".safetensors") for name in written) > 2
    assert synced == Counter(written), "each shard, the index and every other file fsynced exactly once"
