"""Statistics files written one tensor at a time: a valid safetensors file once finished, nothing before."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from obim_trainer.calibration.stats_file import (
    KEY_PLACEHOLDER,
    StatsFile,
    StatsFileWriter,
    header_room,
    move_stats_file,
    set_stats_key,
)
from obim_trainer.errors import CalibrationError


def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 5, generator=gen),
        "b.weight": torch.randn(3, 3, generator=gen).double(),
        "c.weight": torch.zeros(0, 0),
    }


def test_streamed_file_reads_back_with_its_metadata_and_a_key_set_later(tmp_path):
    metadata = {"maps": {"a.weight": "a.weight", "b.weight": "b.weight"}, "count": {"a.weight": 7}}
    room = 2 * header_room({n: tuple(t.shape) for n, t in tensors().items()}, metadata, "grams-v2")
    path = tmp_path / "s.safetensors"
    with StatsFileWriter(path, room) as writer:
        for name, tensor in tensors().items():
            writer.add(name, tensor)
            assert not path.exists(), "nothing appears before the header is written"
        written = writer.finish(KEY_PLACEHOLDER, "grams-v2", metadata)
    assert list(tmp_path.iterdir()) == [path] and written.metadata == metadata
    set_stats_key(path, "my-key")
    opened = StatsFile.open(path, "grams-v2", expected_key="my-key")
    assert opened.metadata == metadata
    for name, tensor in tensors().items():
        assert torch.equal(opened.read(name), tensor) and opened.read(name).dtype == tensor.dtype
    with safe_open(str(path), framework="pt") as f:  # the safetensors library itself accepts the padded header
        assert set(f.keys()) == set(tensors())
    with pytest.raises(CalibrationError, match="does not fit the header"):
        set_stats_key(path, "k" * (2 * room))
    moved = tmp_path / "sub" / "t.safetensors"
    move_stats_file(path, moved)
    assert not path.exists() and StatsFile.open(moved, "grams-v2", expected_key="my-key").read("a.weight").shape == (
        5,
        5,
    )


def test_an_interrupted_write_leaves_nothing_and_a_header_larger_than_reserved_still_fits(tmp_path):
    path = tmp_path / "s.safetensors"
    with pytest.raises(KeyboardInterrupt), StatsFileWriter(path, 1024) as writer:
        writer.add("a.weight", torch.ones(4, 4))
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    writer = StatsFileWriter(path, 16)  # too small: the data moves behind a larger header
    for name, tensor in tensors().items():
        writer.add(name, tensor)
    writer.finish("k", "grams-v2", {"maps": {"a.weight": "a.weight"}})
    assert list(tmp_path.iterdir()) == [path]
    opened = StatsFile.open(path, "grams-v2", expected_key="k")
    assert all(torch.equal(opened.read(name), tensor) for name, tensor in tensors().items())
