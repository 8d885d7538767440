"""Statistics cached beside each checkpoint: reused while valid, recomputed when stale, never in place."""

from __future__ import annotations

import pytest
import torch

from obim_trainer.calibration import ActivationStats, load_or_compute_stats, stats_key, stats_path
from obim_trainer.calibration.stats_cache import STATS_DIRNAME


def fake_stats(value: float) -> ActivationStats:
    return ActivationStats({"w": torch.full((3,), value)}, {"w": 4}, {"w": 1}, torch.tensor([1, 2]))


@pytest.fixture
def ckpt(tmp_path):
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_reuse_then_invalidation_by_key(ckpt, tmp_path):
    calls = []

    def compute(v=1.0):
        calls.append(v)
        return fake_stats(v)

    key = stats_key("calib", "ckpt-v1")
    _, source = load_or_compute_stats(ckpt, key, compute, cache_dir=tmp_path / "cache")
    stats, source2 = load_or_compute_stats(ckpt, key, compute, cache_dir=tmp_path / "cache")
    assert (source, source2, len(calls)) == ("computed", "cached", 1)
    assert torch.equal(stats.sq_sum["w"], torch.ones(3))
    other = stats_key("calib", "ckpt-v2")
    assert other != key and stats_key("calib2", "ckpt-v1") != key
    _, source3 = load_or_compute_stats(ckpt, other, lambda: compute(2.0), cache_dir=tmp_path / "cache")
    assert source3 == "computed" and calls == [1.0, 2.0]
    assert stats_path(ckpt, key).is_file() and stats_path(ckpt, other).is_file()


def test_corrupt_file_is_recomputed(ckpt, tmp_path):
    key = stats_key("c", "k")
    load_or_compute_stats(ckpt, key, lambda: fake_stats(1.0), cache_dir=tmp_path / "cache")
    stats_path(ckpt, key).write_bytes(b"broken")
    stats, source = load_or_compute_stats(ckpt, key, lambda: fake_stats(3.0), cache_dir=tmp_path / "cache")
    assert source == "computed" and torch.equal(stats.sq_sum["w"], torch.full((3,), 3.0))


def test_unwritable_checkpoint_folder_uses_the_cache_dir(ckpt, tmp_path):
    # a file where the statistics folder should be makes the checkpoint folder unwritable for us, even as root
    (ckpt / STATS_DIRNAME).write_text("not a folder")
    _, source = load_or_compute_stats(ckpt, "k" * 64, lambda: fake_stats(1.0), cache_dir=tmp_path / "cache")
    assert source == "computed" and (ckpt / STATS_DIRNAME).read_text() == "not a folder"
    assert len(list((tmp_path / "cache").iterdir())) == 1
    _, again = load_or_compute_stats(ckpt, "k" * 64, lambda: fake_stats(2.0), cache_dir=tmp_path / "cache")
    assert again == "cached"


def test_existing_checkpoint_files_are_untouched(ckpt, tmp_path):
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ckpt.iterdir()}
    load_or_compute_stats(ckpt, stats_key("c", "k"), lambda: fake_stats(1.0), cache_dir=tmp_path / "cache")
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ckpt.iterdir() if p.name != STATS_DIRNAME}
    assert after == before
