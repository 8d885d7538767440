"""Outputs that appear whole or not at all: every file and folder the project writes goes through here.

A merge writes into a temporary sibling of the output folder (same parent, so the same
filesystem and an atomic rename), fsyncs everything and renames it into place. Any failure,
Ctrl-C included, removes the temporary folder: the inputs and any earlier output are untouched.
An existing folder is replaced in one step (:func:`replace_folder`: the two folders swap names with
``renameat2(RENAME_EXCHANGE)`` on Linux), so a crash at any moment leaves the old or the new one.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from obim_trainer.errors import OutputError
from obim_trainer.settings.names import setting_name

logger = logging.getLogger(__name__)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and every folder, so a rename publishes data already on disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


@contextmanager
def atomic_output_file(path: Path, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; it becomes ``path`` when the block ends cleanly.

    The file is fsynced, renamed over ``path`` in one step and the folder fsynced, so a crash at any
    moment leaves the old file or the new one, never a part. On an exception (Ctrl-C included) the
    temporary file is deleted and ``path`` is as it was. It is created with ``mode`` less the umask,
    as ``open()`` would, so readers see the permissions a plain write gives.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
    try:
        yield partial
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
        _fsync_dir(path.parent)
    finally:
        partial.unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write ``path`` whole or not at all (:func:`atomic_output_file`); ``str`` is written as UTF-8."""
    with atomic_output_file(path) as partial:
        partial.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def rename_durably(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` (same filesystem: one atomic step) and fsync the folder, so the new
    name survives a crash; for files finished elsewhere and folders moved aside."""
    os.replace(source, target)
    _fsync_dir(Path(target).parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_location(output: Path, *, overwrite: bool, inputs: Sequence[Path]) -> Path:
    """Refuse an output that is, contains or lies inside an input folder (symlinks resolved), that
    is a file, or that exists without ``overwrite``. Returns the resolved output path."""
    target = Path(output).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source:
            raise OutputError(f"output {output} is the input folder {given}; write the merged model somewhere else")
        if _is_within(target, source):
            raise OutputError(
                f"output {output} lies inside the input folder {given}; choose a folder outside every input"
            )
        if _is_within(source, target):
            raise OutputError(
                f"output {output} contains the input folder {given}, which replacing it would delete; "
                "choose a folder that holds no input"
            )
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {output} exists and is a file, not a folder; choose another output folder")
    if target.exists() and not overwrite:
        raise OutputError(
            f"output {output} already exists; set {setting_name('overwrite')} to replace it or choose another folder"
        )
    return target


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _warn_about_leftovers(target: Path) -> None:
    if not target.parent.is_dir():
        return
    leftovers = sorted(
        p.name for kind in ("tmp", "old") for p in target.parent.glob(f".{target.name}.{kind}-*") if p.is_dir()
    )
    if leftovers:
        logger.warning(
            "found %s in %s, left by an interrupted write (or one still running); delete them to free the space",
            ", ".join(leftovers),
            target.parent,
        )


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _libc_function(name: str, argtypes: tuple[type, ...]) -> Callable[..., int] | None:
    """The C library's function ``name`` (setting errno) taking ``argtypes``, or ``None`` where there is none."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


def _renameat2() -> Callable[..., int] | None:
    """glibc's ``renameat2`` (2.28+, Linux), or ``None`` where there is none."""
    return _libc_function("renameat2", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint))


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of the file ``fd`` to disk, without waiting.

    Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: the disk then writes a merge's output while
    the merge goes on, and the fsync before the folder is published waits for little (otherwise the
    kernel holds gigabytes of dirty pages until then). Advisory: nothing is promised about durability
    (the fsync still gives that). Returns ``False`` where the system cannot (nothing happened).
    """
    function = _libc_function("sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))
    return function is not None and function(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0


def exchange(first: Path, second: Path) -> bool:
    """Swap the names of two existing paths in one atomic step; ``False`` where the system or the
    filesystem cannot (then nothing changed). Raises :class:`OSError` for any other failure."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def replace_folder(new: Path, target: Path) -> None:
    """Make the complete folder ``new`` become ``target``; an existing ``target`` is replaced in one
    atomic step where the system can swap the two (else it is moved aside first, and back if the
    rename fails), then deleted. At every moment ``target`` is the old folder or the new one."""
    if not target.exists():
        new.rename(target)
    elif exchange(new, target):
        _delete_previous(new)
    else:
        old = _sibling(target, "old")
        try:
            target.rename(old)
            new.rename(target)
        except BaseException:
            if old.exists() and not target.exists():
                old.rename(target)
            raise
        _delete_previous(old)
    _fsync_dir(target.parent)


def _delete_previous(old: Path) -> None:
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        logger.warning("could not delete the previous output, moved aside to %s; delete it yourself", old)


@contextmanager
def atomic_output_dir(output: Path, *, overwrite: bool = False, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``output`` when the block ends without an exception.

    Refusals (:func:`check_output_location`) happen before anything is written. On an exception,
    :class:`KeyboardInterrupt` included, the temporary folder is deleted and the exception
    re-raised; an earlier ``output`` is left as it was.
    """
    target = check_output_location(Path(output), overwrite=overwrite, inputs=inputs)
    _warn_about_leftovers(target)
    tmp = _sibling(target, "tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(
            f"cannot create {tmp} next to the output {output} ({exc.strerror or exc}); choose a writable location"
        ) from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        fsync_tree(tmp)
        replace_folder(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise OutputError(
                f"could not move the finished output into {output} ({exc}); any earlier output is unchanged. "
                "Check free disk space and permissions, then run again"
            ) from exc
        raise
    logger.info("wrote %s", target)
