"""The project's one native library: a few fused CPU loops, loaded with ctypes.

Elementwise torch calls each make a full pass over memory, and one step of iterative merging
takes about fifteen of them (scores, comparisons, counts, masks, the bitwise copy). On a CPU that
is what bounds a merge, not the arithmetic. ``native/fused_take.cpp`` does the same work in three
passes, TIES' disjoint merge (:mod:`~obim_trainer.merging.sign_consensus`) in one, and the engine's
NaN/Inf check of its inputs (:mod:`~obim_trainer.pipeline.input_check`) without torch's threads. It uses no
Python or torch headers.

Where it comes from, in this order:

1. Built when the package was installed (``setup.py``): ``native/fused_take_<level>.so`` beside
   the source, one library per instruction-set level; the CPU picks the level (see
   :mod:`~obim_trainer.merging.native.build`).
2. Only where that was impossible (no compiler at install time, a source checkout on the path):
   compiled on first use into ``$OBIM_CACHE_DIR/kernels`` (default ``~/.cache/obim_trainer/kernels``),
   named by a hash of the source, the flags and the compiler. One process compiles while every
   other one (the other ranks, merge workers) waits on a file lock, for at most
   :data:`LOCK_TIMEOUT_S`; a library in that folder is loaded only if the current user owns it
   and nobody else can write it or its folder (anyone who can replace it runs code in this process).

Without a library (no compiler, a failed build, an unsafe cache, ``OBIM_NATIVE_KERNELS=0``) the
torch path runs instead, with one WARNING that says why; the results are bit-identical either way
(tested), only slower. Which path merged is recorded in ``obim_merge.json`` (:func:`kernel_state`).
Set ``CXX`` to choose the compiler.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from obim_trainer._user_cache import cache_dir
from obim_trainer.merging.native.build import (
    FLAGS,
    SOURCE,
    NativeBuildError,
    compile_library,
    levels,
    library_name,
)

logger = logging.getLogger(__name__)

__all__ = ["DISABLE_ENV", "SOURCE", "KernelState", "NativeBuildError", "build_library", "kernel_state"]

DISABLE_ENV = "OBIM_NATIVE_KERNELS"
INSTALLED = SOURCE.parent
LOCK_TIMEOUT_S = 600
"""How long a process waits for another one's first-use build before it merges with torch."""

_i64, _u64, _f32, _int, _ptr = ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "obim_select": (
        _int,
        [
            *(_ptr, _ptr, _ptr, _ptr, _int, _int, _u64),  # the scores' sources
            *(_i64, _i64, _i64, _int, _ptr, _ptr, _ptr, _i64),  # shape, sample stride, the variants
            *(_ptr, _ptr, _ptr, _ptr, _int),  # what each variant takes, its status; threads
        ],
    ),
    "obim_take_many": (
        _int,
        [
            *(_ptr, _ptr, _ptr, _ptr, _int, _int, _u64),  # the scores' sources
            *(_int, _int, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr),  # the variants: masks, choices, results
            *(_i64, _i64, _int, _int),
        ],
    ),
    "obim_disjoint_merge": (None, [_ptr, _i64, _ptr, _ptr, _int, _ptr, _i64, _int]),
    "obim_all_finite": (_int, [_ptr, _i64, _int, _u64]),
    "obim_cpu_level": (_int, []),
    "obim_build_level": (_int, []),
}


@dataclass(frozen=True)
class KernelState:
    """Which path iterative merging takes in this process, and why; recorded in ``obim_merge.json``."""

    library: ctypes.CDLL | None
    origin: str  # "installed", "built on first use" or "none"
    detail: str  # the library's path, or why there is none

    def to_dict(self) -> dict[str, str]:
        path = "native" if self.library is not None else "torch"
        return {"path": path, "origin": self.origin, ("library" if self.library is not None else "reason"): self.detail}


def _compiler_identity(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError as exc:
        raise NativeBuildError(f"C++ compiler {compiler!r} cannot be run ({exc}); set CXX to a working one") from None


def check_private(path: Path) -> None:
    """Refuse a cached library (or its folder) that another user owns or can write: it would run as us."""
    for item in (path.parent, path):
        info = item.stat()
        if info.st_uid != os.getuid():
            raise NativeBuildError(f"{item} belongs to user id {info.st_uid}, not to this user; delete it")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise NativeBuildError(f"{item} is writable by other users; delete it (or chmod go-w it)")


def _locked(directory: Path) -> IO[str]:
    """An exclusive lock on ``directory/.lock`` (blocking at most :data:`LOCK_TIMEOUT_S`), as an open file."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle = (directory / ".lock").open("a")
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise NativeBuildError(
                    f"another process held {directory / '.lock'} for more than {LOCK_TIMEOUT_S} s while compiling; "
                    "if none is running, delete the lock file"
                ) from None
            time.sleep(0.2)


def build_library(source: Path, directory: Path, compiler: str, level: str = "base") -> Path:
    """Compile one level of ``source`` into ``directory`` unless an identical build is there; return its path.

    The build runs under the folder's lock: of processes starting together one compiles, the others
    wait and then find the library. The library found is checked with :func:`check_private`.

    Raises:
        NativeBuildError: the compiler cannot be run, rejects the source (its last lines are quoted) or
            takes too long; the lock is not free in time; the cached file is not private to this user.
    """
    extra = levels()[level]
    identity = "\0".join([source.read_text(), " ".join((*FLAGS, *extra)), _compiler_identity(compiler)])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    target = directory / f"{source.stem}-{level}-{digest}.so"
    if not target.is_file():
        handle = _locked(directory)
        try:
            if not target.is_file():  # another process may have built it while this one waited
                started = time.monotonic()
                compile_library(source, target, compiler, extra)
                logger.info("compiled %s in %.1f s", target, time.monotonic() - started)
        finally:
            handle.close()
    check_private(target)
    return target


def load_library(path: Path) -> ctypes.CDLL:
    """The compiled library with its functions' argument and result types declared.

    Raises:
        OSError: it cannot be loaded, or lacks one of the functions (built from an older source).
    """
    library = ctypes.CDLL(str(path))
    for name, (result, arguments) in _SIGNATURES.items():
        try:
            function = getattr(library, name)
        except AttributeError:
            raise OSError(f"{path} has no {name}: it was built from an older source") from None
        function.restype = result
        function.argtypes = arguments
    return library


def _best(find: Callable[[str], Path]) -> Path:
    """The library of the highest level this CPU runs; ``find(level)`` gives a level's path."""
    cpu_level = load_library(find("base")).obim_cpu_level()  # the baseline runs on every CPU of the architecture
    runnable = [level for level in levels() if level == "base" or cpu_level >= int(level.removeprefix("v"))]
    return find(runnable[-1])  # levels() lists them from the baseline up


def _installed() -> Path | None:
    """The install-time library for this CPU, if ``setup.py`` built them (all levels)."""
    if not all((INSTALLED / library_name(level)).is_file() for level in levels()):
        return None
    return _best(lambda level: INSTALLED / library_name(level))


@functools.cache
def kernel_state() -> KernelState:
    """The fused loops, found once per process (see the module docstring); a fallback is one WARNING."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        logger.info("%s=0: iterative merging uses the torch path", DISABLE_ENV)
        return KernelState(None, "none", f"{DISABLE_ENV}=0")
    try:
        installed = _installed()
        if installed is not None:
            return KernelState(load_library(installed), "installed", str(installed))
    except OSError as exc:
        logger.warning("the installed merge loops %s cannot be loaded (%s); compiling them", INSTALLED, exc)
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        reason = "no C++ compiler found at install time or now (install g++ or set CXX, then reinstall)"
    else:
        try:
            path = _best(lambda level: build_library(SOURCE, cache_dir("kernels"), compiler, level))
            return KernelState(load_library(path), "built on first use", str(path))
        except (NativeBuildError, OSError) as exc:
            reason = str(exc)
    logger.warning("%s; iterative merging uses the slower torch path (results are the same)", reason)
    return KernelState(None, "none", reason)


def native_library() -> ctypes.CDLL | None:
    """The fused loops, or ``None`` for "use torch" (:func:`kernel_state` says why)."""
    return kernel_state().library
