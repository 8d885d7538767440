"""The project's one native library: a few fused CPU loops, compiled on first use and loaded with ctypes.

Elementwise torch calls each make a full pass over memory, and one step of iterative merging
takes about fifteen of them (scores, comparisons, counts, masks, the bitwise copy). On a CPU that
is what bounds a merge, not the arithmetic. ``native/*.cpp`` does the same work in three passes.
It uses no Python or torch headers, so it builds with any C++20 compiler in about a second; the
shared object is cached under ``$OBIM_CACHE_DIR/kernels`` (default ``~/.cache/obim_trainer/kernels``),
named by a hash of the source, the flags and the compiler, and written atomically so that
processes starting together do not see half a file.

Without a compiler, when the build fails, or with ``OBIM_NATIVE_KERNELS=0``, the torch path
runs instead; the results are bit-identical either way (tested), only slower. Set ``CXX`` to
choose the compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from obim_trainer.user_cache import cache_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "fused_take.cpp"
FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-fast-math", "-march=native")
DISABLE_ENV = "OBIM_NATIVE_KERNELS"

_i64, _u64, _f32, _int, _ptr = ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_SIGNATURES: dict[str, tuple[type, list[type]]] = {
    "obim_collect": (
        _int,
        [_ptr, _ptr, _ptr, _ptr, _int, _int, _u64, _ptr, _i64, _i64, _f32, _f32, _i64, _ptr, _ptr, _ptr, _ptr, _int],
    ),
    "obim_kth_largest": (_f32, [_ptr, _i64, _i64]),
    "obim_take": (
        _int,
        [_ptr, _ptr, _ptr, _int, _int, _u64, _int, _ptr, _ptr, _i64, _i64, _f32, _i64, _ptr, _ptr, _int, _int],
    ),
}


class NativeBuildError(RuntimeError):
    """The compiler is missing or failed; the message says which and how to proceed."""


def _compiler_identity(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError as exc:
        raise NativeBuildError(f"C++ compiler {compiler!r} cannot be run ({exc}); set CXX to a working one") from None


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's feature flags (a shared cache may serve several machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.machine())


def build_library(source: Path, directory: Path, compiler: str) -> Path:
    """Compile ``source`` into ``directory`` unless an identical build is already there; return its path.

    Raises:
        NativeBuildError: the compiler cannot be run or rejects the source (its last lines are quoted).
    """
    identity = "\0".join([source.read_text(), " ".join(FLAGS), _compiler_identity(compiler), _cpu_identity()])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    target = directory / f"{source.stem}-{digest}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        built = subprocess.run([compiler, *FLAGS, str(source), "-o", partial], capture_output=True, text=True)
        if built.returncode != 0:
            tail = "\n".join(built.stderr.strip().splitlines()[-5:])
            raise NativeBuildError(f"{compiler} could not compile {source} (exit {built.returncode}):\n{tail}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def load_library(path: Path) -> ctypes.CDLL:
    """The compiled library with its functions' argument and result types declared."""
    library = ctypes.CDLL(str(path))
    for name, (result, arguments) in _SIGNATURES.items():
        function = getattr(library, name)
        function.restype = result
        function.argtypes = arguments
    return library


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The fused loops, built once per machine and loaded once per process; ``None`` means "use torch".

    Logged once: why the native path is off (disabled, no compiler, failed build).
    """
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        logger.info("%s=0: iterative merging uses the torch path", DISABLE_ENV)
        return None
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        logger.warning(
            "no C++ compiler found (set CXX, or install g++): iterative merging uses the slower torch path; "
            "results are the same"
        )
        return None
    try:
        return load_library(build_library(SOURCE, cache_dir("kernels"), compiler))
    except (NativeBuildError, OSError) as exc:
        logger.warning("%s; iterative merging uses the slower torch path (results are the same)", exc)
        return None
