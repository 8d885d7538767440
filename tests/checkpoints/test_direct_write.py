"""Large writes past the page cache: exact bytes wherever they land, and a refused direct write falls back."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from obim_trainer.checkpoints.direct_write import BLOCK, MIN_DIRECT_BYTES, STAGE_BYTES, DirectFile


def supports_direct(folder: Path) -> bool:
    """Whether this file system takes one aligned direct write (tmpfs and ext4 on Linux do)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = folder / "probe"
    block = mmap.mmap(-1, BLOCK)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
        try:
            return os.pwrite(fd, block, 0) == BLOCK
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        block.close()
        probe.unlink(missing_ok=True)


def sized_file(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, size)
    return fd


def random_bytes(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def test_unaligned_writes_from_two_writers_are_exact_and_go_direct(tmp_path):
    # one range past the stage size and one past the direct minimum, meeting inside a block, as two workers'
    # tensors do in a shared shard; plus a small write at the front (a header)
    cut = STAGE_BYTES + 3 * BLOCK + 77
    size = cut + MIN_DIRECT_BYTES + 5 * BLOCK + 123
    data, path = random_bytes(size), tmp_path / "shard.bin"
    first, second = sized_file(path, size), os.open(path, os.O_RDWR)
    writers = [DirectFile(path, first), DirectFile(path, second)]
    try:
        writers[1].write_at(cut, memoryview(data[cut:]))  # the second worker first
        writers[0].write_at(101, memoryview(data[101:cut]))
        writers[0].write_at(0, memoryview(data[:101]))
        assert [w.direct for w in writers] == [supports_direct(tmp_path)] * 2  # no write was refused
    finally:
        for writer in writers:
            writer.close()
        os.close(first)
        os.close(second)
    assert np.array_equal(np.fromfile(path, dtype=np.uint8), data)


def test_a_refused_direct_write_falls_back_to_the_page_cache(tmp_path):
    if not supports_direct(tmp_path):
        pytest.skip("this file system takes no direct writes")
    size = 2 * MIN_DIRECT_BYTES
    data, path = random_bytes(size, seed=1), tmp_path / "shard.bin"
    fd = sized_file(path, size)
    writer = DirectFile(path, fd)
    try:
        # an offset the kernel refuses for direct I/O (EINVAL): the bytes go through the page cache instead
        writer._write_blocks(1, memoryview(data[1:]))
        assert not writer.direct
        writer.write_at(0, memoryview(data[:1]))
        writer.write_at(0, memoryview(data))  # later writes are buffered too
    finally:
        writer.close()
        os.close(fd)
    assert np.array_equal(np.fromfile(path, dtype=np.uint8), data)


def test_small_writes_stay_in_the_page_cache(tmp_path):
    size = MIN_DIRECT_BYTES + BLOCK - 1  # from offset 3: one block short of the direct minimum
    data, path = random_bytes(size, seed=2), tmp_path / "shard.bin"
    fd = sized_file(path, size)
    writer = DirectFile(path, fd)
    try:
        writer.write_at(3, memoryview(data[3:]))
        writer.write_at(0, memoryview(data[:3]))
        assert writer._stage is None  # never staged: nothing went direct
    finally:
        writer.close()
        os.close(fd)
    assert np.array_equal(np.fromfile(path, dtype=np.uint8), data)
