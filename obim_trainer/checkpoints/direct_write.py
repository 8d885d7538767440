"""Writing large tensors to a file past the page cache (``O_DIRECT``), where the system allows it.

Why: a buffered write to a new file makes the kernel allocate, and on a virtual machine the
hypervisor back, a fresh page-cache page per 4 KiB; on this project's CI machine that costs the
writing thread about as much CPU as merging the tensor (0.4–1 GB/s), while a direct write
leaves the copy to the device (2.6 GB/s, almost no CPU), so the merge's threads keep the cores.
A merge's output is read again at most once, so caching it buys little, and writing a
multi-gigabyte output no longer evicts the user's cached checkpoints.

Direct I/O needs the file offset, the length and the memory address aligned to the device's block:
each large write copies its whole 4 KiB blocks through one reused page-aligned staging buffer and
writes them directly; the partial blocks at its two ends (which the neighbouring tensors share,
and which another worker of a parallel merge may write) and every small write go through the page
cache. Direct and buffered writes never touch the same block, so the two stay coherent. Where the
system refuses (no ``O_DIRECT``, a file system without it, a device with larger blocks), every write
is buffered. Durability is unchanged: the caller's fsync covers both.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from pathlib import Path

from obim_trainer.checkpoints.atomic import start_writeback

logger = logging.getLogger(__name__)

BLOCK = 4096
"""Direct writes cover whole blocks of this size at offsets that are multiples of it (a page)."""
STAGE_BYTES = 8 << 20
"""The staging buffer: direct writes go out in pieces of at most this size."""
MIN_DIRECT_BYTES = 1 << 20
"""Writes with fewer whole blocks than this go through the page cache (too small to gain)."""


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _open_direct(path: Path) -> int | None:
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None  # the file system cannot
        raise


class DirectFile:
    """Positioned writes into one open file, the whole aligned blocks of large ones past the page cache.

    ``fd`` is the file's ordinary descriptor (kept open by the caller, who also fsyncs and closes it);
    this object opens a second, direct one on ``path`` and closes it in :meth:`close`.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self._path = path
        self._fd = fd
        self._direct = _open_direct(path)
        self._stage: mmap.mmap | None = None

    @property
    def direct(self) -> bool:
        """Whether large writes still go past the page cache."""
        return self._direct is not None

    def write_at(self, offset: int, data: memoryview) -> None:
        """Write the bytes ``data`` (a contiguous 1-D byte view) at ``offset``."""
        first = -(-offset // BLOCK) * BLOCK
        last = (offset + data.nbytes) // BLOCK * BLOCK
        if self._direct is None or last - first < MIN_DIRECT_BYTES:
            self._buffered(offset, data)
            return
        self._buffered(offset, data[: first - offset])
        self._buffered(last, data[last - offset :])
        self._write_blocks(first, data[first - offset : last - offset])

    def _buffered(self, offset: int, data: memoryview) -> None:
        if data.nbytes:
            _pwrite_all(self._fd, data, offset)
            start_writeback(self._fd, offset, data.nbytes)  # the disk works while the merge goes on

    def _write_blocks(self, offset: int, data: memoryview) -> None:
        """``data`` (whole blocks) at the block-aligned ``offset``: directly, piece by piece through the stage."""
        if self._stage is None:
            self._stage = mmap.mmap(-1, STAGE_BYTES)  # page-aligned
        stage = memoryview(self._stage)
        try:
            for start in range(0, data.nbytes, STAGE_BYTES):
                piece = data[start : start + STAGE_BYTES]
                stage[: piece.nbytes] = piece
                try:
                    _pwrite_all(self._direct, stage[: piece.nbytes], offset + start)  # type: ignore[arg-type]
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    logger.info("direct writes refused on %s (%s); writing through the page cache", self._path, exc)
                    self._close_direct()
                    self._buffered(offset + start, data[start:])
                    return
        finally:
            stage.release()

    def _close_direct(self) -> None:
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None

    def close(self) -> None:
        """Close the direct descriptor and free the stage (the ordinary one stays the caller's)."""
        self._close_direct()
        if self._stage is not None:
            self._stage.close()
            self._stage = None
