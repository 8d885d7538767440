"""Outputs appear whole or not at all; earlier outputs and inputs survive failures."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import pytest

from obim_trainer.checkpoints import atomic, atomic_output_dir, fsync_tree
from obim_trainer.errors import OutputError


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def earlier_output(folder: Path) -> dict[str, bytes]:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "config.json").write_bytes(b'{"old": true}')
    return snapshot(folder)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def refusal(output: Path, **kwargs) -> str:
    """The message of the OutputError that refuses ``output`` before the block is entered."""
    with pytest.raises(OutputError) as refused, atomic_output_dir(output, **kwargs):
        pytest.fail("must not be entered")
    return str(refused.value)


def test_success_renames_a_hidden_sibling_into_place(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        assert not any(tmp.iterdir())
        (tmp / "a.txt").write_text("new")
        assert not out.exists(), "nothing appears before the block ends"
    assert snapshot(out) == {"a.txt": b"new"} and not leftovers(tmp_path)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
def test_failure_keeps_the_earlier_output_byte_for_byte(tmp_path, error):
    out = tmp_path / "out"
    before = earlier_output(out)
    with pytest.raises(type(error)), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half-written")
        raise error
    assert snapshot(out) == before and not leftovers(tmp_path)


def test_failure_without_earlier_output_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "out"
    earlier_output(out)
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert snapshot(out) == {"a.txt": b"new"} and not leftovers(tmp_path)


def test_an_existing_folder_is_swapped_with_the_new_one_in_one_step(tmp_path, monkeypatch):
    new, target = tmp_path / "new", tmp_path / "target"
    new.mkdir()
    (new / "a.txt").write_text("new")
    earlier_output(target)
    if not atomic.exchange(new, target):
        pytest.skip("this filesystem cannot exchange two names (renameat2 RENAME_EXCHANGE)")
    atomic.exchange(new, target)  # swapped back: both exist throughout
    monkeypatch.setattr(Path, "rename", lambda *_: pytest.fail("moved the old folder aside instead of swapping"))
    atomic.replace_folder(new, target)
    assert snapshot(target) == {"a.txt": b"new"} and not new.exists() and not leftovers(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        atomic.exchange(target, tmp_path / "missing")


def test_failed_rename_restores_the_earlier_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = earlier_output(out)
    monkeypatch.setattr(atomic, "_renameat2", lambda: None)  # a system without renameat2: two renames
    real_rename = Path.rename

    def rename(self, target):
        if ".tmp-" in self.name:
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with (
        pytest.raises(OutputError, match=r"could not move .* into .*out .*earlier output is unchanged"),
        atomic_output_dir(out, overwrite=True) as tmp,
    ):
        (tmp / "a.txt").write_text("new")
    assert snapshot(out) == before and not leftovers(tmp_path)


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    before = earlier_output(out)
    assert "out already exists; set overwrite=True to replace it" in refusal(out)
    (tmp_path / "file").write_text("x")
    assert "file exists and is a file, not a folder" in refusal(tmp_path / "file", overwrite=True)
    assert snapshot(out) == before and not leftovers(tmp_path)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("ckpt", r"is the input folder .*ckpt; write the merged model somewhere else"),
        ("ckpt/merged", r"lies inside the input folder .*ckpt; choose a folder outside every input"),
        (".", r"contains the input folder .*ckpt, which replacing it would delete; choose a folder that holds no"),
        ("link", r"link is the input folder .*ckpt"),
        ("link/merged", r"link/merged lies inside the input folder .*ckpt"),
    ],
)
def test_output_overlapping_an_input_is_refused_before_anything_is_written(tmp_path, output, message):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "link").symlink_to(ckpt)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert re.search(message, refusal(tmp_path / output, overwrite=True, inputs=[tmp_path.parent / "unrelated", ckpt]))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_leftovers_of_an_interrupted_run_are_reported(tmp_path, caplog):
    (tmp_path / ".out.tmp-1-abcd").mkdir()
    with caplog.at_level(logging.WARNING), atomic_output_dir(tmp_path / "out"):
        pass
    assert ".out.tmp-1-abcd" in caplog.text and "delete them" in caplog.text


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to map descriptors to paths")
def test_fsync_tree_syncs_every_file_and_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    for name in ("a", "sub/b"):
        (tmp_path / name).write_text(name)
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    fsync_tree(tmp_path)
    assert sorted(synced) == sorted(str(p) for p in (tmp_path, tmp_path / "a", tmp_path / "sub", tmp_path / "sub/b"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_starts_on_an_open_file_and_reports_what_it_cannot_do(tmp_path):
    path = tmp_path / "shard.bin"
    data = os.urandom(1 << 20)
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        assert atomic.start_writeback(handle.fileno(), 0, len(data))
        assert not atomic.start_writeback(handle.fileno(), -1, len(data))  # EINVAL: nothing started
    assert path.read_bytes() == data  # advisory: the bytes are what was written
    read_only = os.open(path, os.O_RDONLY)
    os.close(read_only)
    assert not atomic.start_writeback(read_only, 0, len(data))  # EBADF: a closed descriptor
