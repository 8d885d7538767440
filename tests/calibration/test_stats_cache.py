"""Statistics cached per checkpoint: reused while valid, recomputed when stale, written into the user cache
(beside the checkpoint only when asked), never into the checkpoint's own files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from obim_trainer.calibration import (
    ActivationStats,
    CalibrationSet,
    load_calibration_texts,
    load_or_compute_stats,
    stats_key,
    stats_path,
    tokenize_calibration,
)
from obim_trainer.calibration.fisher_stats import KIND as FISHER_KIND
from obim_trainer.calibration.gram_stats import KIND as GRAM_KIND
from obim_trainer.calibration.stats_cache import ACTIVATIONS, STATS_DIRNAME, StatsOrigin, describe_calibration
from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.errors import CalibrationError
from tests.conftest import copy_tree


@pytest.fixture
def ckpt(llama_family, tmp_path) -> Path:
    return copy_tree(llama_family[1][0], tmp_path / "checkpoint-10")


def make_calibration(tokenizer_dir: Path, calibration_jsonl: Path, samples: int) -> CalibrationSet:
    texts = load_calibration_texts(calibration_jsonl, num_samples=samples)
    return tokenize_calibration(texts, AutoTokenizer.from_pretrained(tokenizer_dir), max_length=32)


@pytest.fixture
def calibration(tokenizer_dir, calibration_jsonl) -> CalibrationSet:
    return make_calibration(tokenizer_dir, calibration_jsonl, 8)


class CountingCompute:
    """``compute`` for the cache: the real statistics of a checkpoint folder, counting the calls."""

    def __init__(self, folder: Path, calibration: CalibrationSet) -> None:
        self.folder, self.calibration, self.calls = folder, calibration, 0

    def __call__(self) -> ActivationStats:
        self.calls += 1
        model = AutoModelForCausalLM.from_pretrained(self.folder)
        return ActivationStats.collect(model, self.calibration, batch_size=4, progress=False)


def key_of(folder: Path, calibration: CalibrationSet) -> str:
    with open_checkpoint(folder) as reader:
        return stats_key(calibration.fingerprint(), reader.fingerprint())


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def assert_same_stats(a: ActivationStats, b: ActivationStats) -> None:
    assert a.count == b.count and a.in_axis == b.in_axis and torch.equal(a.token_counts, b.token_counts)
    assert all(torch.equal(a.sq_sum[n], b.sq_sum[n]) for n in a.sq_sum)


def test_second_call_reuses_the_statistics_in_the_cache_and_the_checkpoint_is_not_written(ckpt, calibration, tmp_path):
    before = snapshot(ckpt)
    compute = CountingCompute(ckpt, calibration)
    key = key_of(ckpt, calibration)
    first, source = load_or_compute_stats(ckpt, key, compute, cache_dir=tmp_path / "cache")
    again, source2 = load_or_compute_stats(ckpt, key, compute, cache_dir=tmp_path / "cache")
    assert (source, source2, compute.calls) == ("computed", "cached", 1)
    assert_same_stats(first, again)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"checkpoint-10-{key[:16]}.safetensors"]
    assert snapshot(ckpt) == before and not (ckpt / STATS_DIRNAME).exists()
    _, forced = load_or_compute_stats(ckpt, key, compute, cache_dir=tmp_path / "cache", recompute=True)
    assert forced == "computed" and compute.calls == 2


def test_asked_to_the_statistics_go_beside_the_checkpoint_and_are_found_there(ckpt, calibration, tmp_path):
    compute = CountingCompute(ckpt, calibration)
    key = key_of(ckpt, calibration)
    load_or_compute_stats(ckpt, key, compute, cache_dir=tmp_path / "cache", beside=True)
    assert stats_path(ckpt, key) == ckpt / STATS_DIRNAME / f"{key[:16]}.safetensors" and stats_path(ckpt, key).is_file()
    assert not (tmp_path / "cache").exists()
    _, source = load_or_compute_stats(ckpt, key, compute, cache_dir=tmp_path / "other-cache")
    assert source == "cached" and compute.calls == 1, "statistics beside a checkpoint are read without being asked"


def test_a_changed_checkpoint_or_calibration_set_is_recomputed(
    ckpt, calibration, tokenizer_dir, calibration_jsonl, tmp_path
):
    compute = CountingCompute(ckpt, calibration)
    key = key_of(ckpt, calibration)
    before, _ = load_or_compute_stats(ckpt, key, compute, cache_dir=tmp_path / "cache")
    other_calibration = make_calibration(tokenizer_dir, calibration_jsonl, 9)
    other_key = key_of(ckpt, other_calibration)
    assert other_key != key
    _, source = load_or_compute_stats(
        ckpt, other_key, CountingCompute(ckpt, other_calibration), cache_dir=tmp_path / "cache"
    )
    assert source == "computed"

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(3.0)
    model.save_pretrained(ckpt)  # training wrote a new checkpoint into the same folder
    new_key = key_of(ckpt, calibration)
    assert new_key not in (key, other_key)
    after, source = load_or_compute_stats(ckpt, new_key, compute, cache_dir=tmp_path / "cache")
    assert source == "computed" and compute.calls == 2
    name = "model.layers.0.mlp.down_proj.weight"  # input of down_proj grew with up_proj
    assert not torch.allclose(after.sq_sum[name], before.sq_sum[name])
    assert len(list((tmp_path / "cache").iterdir())) == 3


@pytest.mark.parametrize("damage", ["corrupt", "other key"])
def test_unusable_stats_files_are_never_used(ckpt, calibration, tmp_path, damage, caplog):
    compute = CountingCompute(ckpt, calibration)
    key = key_of(ckpt, calibration)
    path = stats_path(ckpt, key)
    path.parent.mkdir()
    if damage == "corrupt":
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00broken")
    else:
        ActivationStats({"x.weight": torch.ones(4)}, {"x.weight": 1}, {"x.weight": 1}).save(path, key="0" * 64)
    with caplog.at_level(logging.WARNING):
        stats, source = load_or_compute_stats(ckpt, key, compute, cache_dir=tmp_path / "cache")
    assert source == "computed" and compute.calls == 1 and "model.layers.0.mlp.up_proj.weight" in stats.sq_sum
    assert f"not using {path}" in caplog.text
    again, source = load_or_compute_stats(ckpt, key, compute, cache_dir=tmp_path / "cache")
    assert source == "cached" and compute.calls == 1
    assert_same_stats(stats, again)


def test_unwritable_checkpoint_folder_falls_back_to_the_cache_dir(ckpt, calibration, tmp_path, caplog):
    # a file where the statistics folder belongs makes the checkpoint unwritable for us, even as root
    (ckpt / STATS_DIRNAME).write_text("not a folder")
    compute = CountingCompute(ckpt, calibration)
    key = key_of(ckpt, calibration)
    with caplog.at_level(logging.WARNING):
        _, source = load_or_compute_stats(ckpt, key, compute, cache_dir=tmp_path / "cache", beside=True)
    stored = list((tmp_path / "cache").iterdir())
    assert source == "computed" and [p.name for p in stored] == [f"checkpoint-10-{key[:16]}.safetensors"]
    assert str(stored[0]) in caplog.text and (ckpt / STATS_DIRNAME).read_text() == "not a folder"
    _, again = load_or_compute_stats(ckpt, key, compute, cache_dir=tmp_path / "cache")
    assert again == "cached" and compute.calls == 1


def test_default_cache_dir_and_nowhere_to_write(ckpt, tmp_path, monkeypatch):
    (ckpt / STATS_DIRNAME).write_text("not a folder")
    stats = ActivationStats({"x.weight": torch.ones(4)}, {"x.weight": 2}, {"x.weight": 1})
    monkeypatch.setenv("OBIM_STATS_CACHE", str(tmp_path / "env-cache"))
    load_or_compute_stats(ckpt, "a" * 64, lambda: stats)
    assert (tmp_path / "env-cache" / f"checkpoint-10-{'a' * 16}.safetensors").is_file()
    (tmp_path / "blocked").write_text("a file, not a folder")
    with pytest.raises(CalibrationError, match=r"nor in .*blocked.*set stats_cache_dir=DIR"):
        load_or_compute_stats(ckpt, "b" * 64, lambda: stats, cache_dir=tmp_path / "blocked", beside=True)
    with pytest.raises(CalibrationError, match=r"cannot store statistics in .*blocked.*set stats_cache_dir=DIR"):
        load_or_compute_stats(ckpt, "b" * 64, lambda: stats, cache_dir=tmp_path / "blocked")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_checkpoint_folder_falls_back_to_the_cache_dir(ckpt, tmp_path):
    ckpt.chmod(0o555)
    try:
        _, source = load_or_compute_stats(
            ckpt, "c" * 64, lambda: ActivationStats(), cache_dir=tmp_path / "cache", beside=True
        )
    finally:
        ckpt.chmod(0o755)
    assert source == "computed" and (tmp_path / "cache" / f"checkpoint-10-{'c' * 16}.safetensors").is_file()
    assert not (ckpt / STATS_DIRNAME).exists()


def test_existing_checkpoint_files_are_never_touched(ckpt, calibration, tmp_path):
    before = snapshot(ckpt)
    compute = CountingCompute(ckpt, calibration)
    key = key_of(ckpt, calibration)
    for recompute in (False, False, True):
        load_or_compute_stats(ckpt, key, compute, cache_dir=tmp_path / "cache", recompute=recompute, beside=True)
    after = snapshot(ckpt)
    assert {name: after[name] for name in before} == before
    assert set(after) - set(before) == {f"{STATS_DIRNAME}/{key[:16]}.safetensors"}


def test_kinds_share_the_cache_but_never_each_others_files(ckpt, calibration, tmp_path):
    """Grams are cached beside the activation statistics under their own key; activation keys are as before."""
    from obim_trainer.calibration import GramStats

    with open_checkpoint(ckpt) as reader:
        activations = stats_key(calibration.fingerprint(), reader.fingerprint())
        grams = stats_key(calibration.fingerprint(), reader.fingerprint(), "grams-v1")
    assert activations == key_of(ckpt, calibration) and grams != activations

    def compute_grams() -> GramStats:
        return GramStats.collect(AutoModelForCausalLM.from_pretrained(ckpt), calibration, progress=False)

    load_or_compute_stats(ckpt, activations, CountingCompute(ckpt, calibration), cache_dir=tmp_path / "c")
    stored, source = load_or_compute_stats(ckpt, grams, compute_grams, cache_dir=tmp_path / "c", load=GramStats.load)
    assert source == "computed" and stored.file.path == tmp_path / "c" / f"checkpoint-10-{grams[:16]}.safetensors"
    again, source = load_or_compute_stats(ckpt, grams, compute_grams, cache_dir=tmp_path / "c", load=GramStats.load)
    assert source == "cached" and again.maps == stored.maps
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2


def test_a_merge_says_in_one_line_why_it_cannot_reuse_the_stored_statistics(
    ckpt, calibration, tokenizer_dir, calibration_jsonl, tmp_path, caplog
):
    """Issue 13: statistics stored beside the checkpoint (as the training leaves them) on other calibration settings,
    or for files that changed since, are recomputed with the reason said once; reusable ones say nothing of it."""

    def merge_asks(calib: CalibrationSet) -> str:
        with open_checkpoint(ckpt) as reader:
            fingerprint = reader.fingerprint()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="obim_trainer.calibration.stats_cache"):
            load_or_compute_stats(
                ckpt,
                stats_key(calib.fingerprint(), fingerprint),
                CountingCompute(ckpt, calib),
                cache_dir=tmp_path / "cache",
                beside=True,
                origin=StatsOrigin.of(calib, ckpt, fingerprint),
            )
        return caplog.text

    assert "recomputing" not in merge_asks(calibration)
    stored = next((ckpt / STATS_DIRNAME).glob("*.safetensors"))
    assert stored.with_suffix(".json").is_file(), "what the statistics were computed from is stored beside them"
    assert "recomputing" not in merge_asks(calibration)  # reused
    described = describe_calibration(calibration)
    fewer = make_calibration(tokenizer_dir, calibration_jsonl, 5)
    said = merge_asks(fewer)
    now = describe_calibration(fewer)
    expected = (
        f"activation statistics for checkpoint-10 were computed with samples=8, longest={described['longest']}, "
        f"tokens={described['tokens']}; this merge asks samples=5, longest={now['longest']}, tokens={now['tokens']}; "
        "recomputing"
    )
    assert expected in said and said.count("recomputing") == 1
    (ckpt / "config.json").write_text((ckpt / "config.json").read_text() + " ")
    os.utime(ckpt / "model.safetensors")  # the files changed: training wrote into the folder again
    assert "the files of checkpoint-10 changed since its activation statistics were computed" in merge_asks(fewer)


@pytest.mark.parametrize("kind", [ACTIVATIONS, GRAM_KIND, FISHER_KIND])
def test_statistics_of_the_format_before_moe_experts_are_never_looked_up(kind, monkeypatch):
    """Files written before MoE routers and experts had entries (format 1) lack them; every kind's key names the
    format, so a merge now computes new statistics instead of reading those as "no statistics" for the experts."""
    from obim_trainer.calibration import stats_cache

    now = stats_key("calibration", "checkpoint", kind)
    monkeypatch.setattr(stats_cache, "FORMAT_VERSION", "1")
    assert stats_key("calibration", "checkpoint", kind) != now
