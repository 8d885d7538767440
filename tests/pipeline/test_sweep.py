"""A sweep of V variants reads each input tensor once and writes the bytes V separate merges write; shards are
fsynced once."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file

from obim_trainer.checkpoints import dispatch
from obim_trainer.checkpoints.reader import SafetensorsReader
from obim_trainer.pipeline import engine
from obim_trainer.pipeline.merge import merge_checkpoints
from obim_trainer.pipeline.variants import MergeVariant, merge_variants, plan_variants
from obim_trainer.settings.merge import MergeConfig
from tests.pipeline.test_merge import NEW_TOKENS, VOCAB_SIZE, extended_run  # noqa: F401 - a fixture
from tests.test_merge_bytes import _ONE_CHECKPOINT, _cases, _record, expected_hashes, tensor_hashes


def recorded_config(family, language_files: dict[str, Path], tmp_path: Path, **settings) -> MergeConfig:
    """The settings ``tests/test_merge_bytes.py`` recorded its merges with."""
    base, ckpts = family
    values = {"base": base, "checkpoints": ckpts, "calibration_data": language_files, "new_languages": ["zh"]}
    values |= {"calibration_samples": 12, "calibration_max_length": 32, "stats_cache_dir": tmp_path / "cache"}
    return MergeConfig.build({**values, "output": tmp_path / "unused", "progress": False, **settings})


def test_a_sweep_of_every_method_split_between_two_workers_writes_the_recorded_bytes(
    llama_family, language_files, tmp_path
):
    """Every method at once, in several shards, split between two workers (sequential RegMean in its own pass),
    each method getting the inputs as read whatever the merges before it did with theirs: every tensor is the
    one ``tests/data/merge_bytes.json`` records for that method's merge made alone."""
    record = _record()
    cases = [c for c in _cases() if c[1] == "llama_family" and c[2] not in _ONE_CHECKPOINT]
    expected = {case: expected_hashes(record, case) for case, *_ in cases}
    variants = [MergeVariant(case, method, params) for case, _, method, params in cases]
    config = recorded_config(llama_family, language_files, tmp_path, out_shard_size="100KB", workers=2)
    folders = {name: result.output for name, result in merge_variants(config, variants, tmp_path / "sweep").items()}
    assert len(list(folders["obim"].glob("*.safetensors"))) > 2, "several shards"
    manifest = json.loads((folders["obim"] / "obim_merge.json").read_text())
    assert manifest["output"]["workers"] == 2
    changed = [case for case, *_ in cases if tensor_hashes(folders[case]) != expected[case]]
    assert not changed, f"{len(changed)} of {len(cases)} merges differ from the record: {changed}"


def test_a_bf16_sweep_copies_no_input(llama_tied_bf16_family, calibration_jsonl, tmp_path, monkeypatch):
    """The merges of a sweep read the shared inputs in place and copy none of them: each OBIM merge builds its
    result in a recycled buffer of its own, which its first write fills (the first checkpoint's values where
    the next one takes nothing), TIES on 16-bit inputs allocates none, and every merge writes the bytes it
    writes made alone."""
    base, ckpts = llama_tied_bf16_family
    settings = {"base": base, "checkpoints": ckpts, "calibration_data": calibration_jsonl, "progress": False}
    config = MergeConfig.build({**settings, "stats_cache_dir": tmp_path / "cache", "output": tmp_path / "unused"})
    variants = plan_variants(["obim", "ties"], {}, [1.0, 0.6], num_models=len(ckpts))
    assert [v.method for v in variants] == ["obim", "obim", "ties"]
    alone = merge_variants(config, variants, tmp_path / "alone", sweep=lambda cs: [merge_checkpoints(c) for c in cs])
    calls: dict[str, list[int]] = {"copy": [], "blank": []}
    for name, original in [("copy", engine.SharedInputs.copy), ("blank", engine.SharedInputs.blank)]:

        def counting(self: engine.SharedInputs, tensor: torch.Tensor, name=name, original=original) -> torch.Tensor:
            calls[name].append(tensor.numel())
            return original(self, tensor)

        monkeypatch.setattr(engine.SharedInputs, name, counting)
    together = merge_variants(config, variants, tmp_path / "together")
    files = together["obim"].output.glob("*.safetensors")
    numel = sum(t.numel() for file in files for t in load_file(file).values())
    assert sum(calls["copy"]) == 0, "no input copied"
    assert sum(calls["blank"]) == 2 * numel, "one result buffer per tensor for each OBIM merge, none for TIES"
    for name in together:
        assert tensor_hashes(together[name].output) == tensor_hashes(alone[name].output), name


def test_obim_merges_differing_only_in_shares_merge_each_tensor_together(
    llama_family, calibration_jsonl, tmp_path, monkeypatch
):
    """OBIM at three total shares: one call merges each weight for all three (one task, each checkpoint
    scored once per step), and every merge writes the bytes it writes made alone."""
    base, ckpts = llama_family
    settings = {"base": base, "checkpoints": ckpts, "calibration_data": calibration_jsonl, "progress": False}
    config = MergeConfig.build({**settings, "stats_cache_dir": tmp_path / "cache", "output": tmp_path / "unused"})
    variants = plan_variants(["obim"], {}, [1.0, 0.8, 0.6], num_models=len(ckpts))
    alone = merge_variants(config, variants, tmp_path / "alone", sweep=lambda cs: [merge_checkpoints(c) for c in cs])
    calls: list[int] = []
    merge_together = engine.MergeEngine.merge_together

    def counting(self, others, plan, inputs, shared):
        calls.append(1 + len(others))
        return merge_together(self, others, plan, inputs, shared)

    monkeypatch.setattr(engine.MergeEngine, "merge_together", counting)
    together = merge_variants(config, variants, tmp_path / "together")
    floating = [t for t in load_file(next(together["obim"].output.glob("*.safetensors"))).values()]
    assert calls and set(calls) == {3} and len(calls) == len([t for t in floating if t.is_floating_point()])
    for name in together:
        assert tensor_hashes(together[name].output) == tensor_hashes(alone[name].output), name


def test_a_sweep_of_checkpoints_with_an_extended_vocabulary_writes_the_bytes_of_each_merge_alone(
    extended_run,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    """The base's rows and the new rows of the embedding and lm_head are two tasks on slices of the shared
    inputs; the merges before the last copy only the slices they write into."""
    base, ckpts, calib = extended_run
    settings = {"base": base, "checkpoints": ckpts, "calibration_data": calib, "progress": False}
    config = MergeConfig.build({**settings, "stats_cache_dir": tmp_path / "cache", "output": tmp_path / "unused"})
    variants = plan_variants(["obim", "ties"], {}, [1.0, 0.6], num_models=len(ckpts))
    alone = merge_variants(config, variants, tmp_path / "alone", sweep=lambda cs: [merge_checkpoints(c) for c in cs])
    together = merge_variants(config, variants, tmp_path / "together")
    assert together["obim"].manifest["output"]["vocab_size"] == VOCAB_SIZE + NEW_TOKENS, "the new rows are merged"
    for name in together:
        assert tensor_hashes(together[name].output) == tensor_hashes(alone[name].output), name


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
