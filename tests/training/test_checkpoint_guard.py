"""Protected copies of selected checkpoints: hard links that outlive rotation, released on drop-out."""

from __future__ import annotations

import os
import shutil

import pytest

from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.errors import OutputError
from obim_trainer.training.checkpoint_guard import CheckpointGuard
from tests.conftest import copy_tree


@pytest.fixture
def checkpoint(llama_family, tmp_path):
    """A Trainer-like checkpoint folder: model files, statistics and training state a merge never reads."""
    folder = copy_tree(llama_family[1][0], tmp_path / "run" / "checkpoint-10")
    (folder / "optimizer.pt").write_bytes(b"optimizer state")
    (folder / "rng_state_0.pth").write_bytes(b"rng")
    (folder / "obim_stats").mkdir()
    (folder / "obim_stats" / "0123456789abcdef.safetensors").write_bytes(b"stats")
    return folder


def test_model_files_are_hard_linked_and_training_state_left_out(checkpoint, tmp_path):
    (checkpoint / "latest").write_text("global_step10")  # DeepSpeed's shards: optimizer state, not needed
    (checkpoint / "global_step10").mkdir()
    (checkpoint / "global_step10" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"shard")
    guard = CheckpointGuard(tmp_path / "run" / "obim" / "selected")
    kept = guard.protect(checkpoint, 10)
    assert kept == guard.path_for(10)
    names = {p.relative_to(kept).as_posix() for p in kept.rglob("*")}
    assert {"model.safetensors", "config.json", "obim_stats/0123456789abcdef.safetensors"} <= names
    assert not {"optimizer.pt", "rng_state_0.pth", "global_step10", "latest"} & names
    assert os.stat(kept / "model.safetensors").st_ino == os.stat(checkpoint / "model.safetensors").st_ino


def test_the_copy_outlives_rotation_with_the_same_fingerprint(checkpoint, tmp_path):
    with open_checkpoint(checkpoint) as reader:
        fingerprint = reader.fingerprint()
        weight = reader.read("model.layers.0.mlp.up_proj.weight")
    kept = CheckpointGuard(tmp_path / "selected").protect(checkpoint, 10)
    shutil.rmtree(checkpoint)  # what save_total_limit does
    with open_checkpoint(kept) as reader:
        assert reader.fingerprint() == fingerprint  # so statistics cached under its key stay valid
        assert reader.read("model.layers.0.mlp.up_proj.weight").equal(weight)


def test_copies_keep_the_fingerprint_where_hard_links_fail(checkpoint, tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    kept = CheckpointGuard(tmp_path / "selected").protect(checkpoint, 10)
    assert os.stat(kept / "model.safetensors").st_ino != os.stat(checkpoint / "model.safetensors").st_ino
    with open_checkpoint(kept) as copy, open_checkpoint(checkpoint) as original:
        assert copy.fingerprint() == original.fingerprint()


def test_protect_is_idempotent_and_release_deletes_only_the_copy(checkpoint, tmp_path):
    guard = CheckpointGuard(tmp_path / "selected")
    kept = guard.protect(checkpoint, 10)
    marker = kept / "marker"
    marker.write_text("x")
    assert guard.protect(checkpoint, 10) == kept and marker.exists()
    guard.release(10)
    assert not kept.exists() and (checkpoint / "model.safetensors").is_file()
    guard.release(10)  # nothing left to release


def test_an_unwritable_location_is_one_clear_error(checkpoint, tmp_path):
    blocker = tmp_path / "obim"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(OutputError, match=r"cannot keep a copy of the selected .*checkpoint-10.*save_total_limit"):
        CheckpointGuard(blocker / "selected").protect(checkpoint, 10)
    assert not list(tmp_path.glob("obim*/selected"))
