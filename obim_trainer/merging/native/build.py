"""Compiling ``fused_take.cpp`` into shared libraries, once per instruction-set level.

Used by ``setup.py`` when the package is installed (the libraries then sit beside this file) and by
:mod:`obim_trainer.merging.native_library` on first use where that was impossible. Only the standard
library is imported here: ``setup.py`` loads this file by its path, before torch or the package exist.

CPU dispatch: instead of ``-march=native`` (what the compiler thinks the build machine is, which a
container or a shared cache folder may not match), each level is a separate library built for a
named ISA level, and the baseline library's ``obim_cpu_level()`` asks the running CPU (cpuid, through
the compiler's runtime) which of them it can execute. Separate files, not one library with
several copies of the code: the copies would share the C++ standard library's inline functions,
and the linker could pick the AVX2 copy of one for the baseline path. Every level computes the
same bits: ``-ffp-contract=off`` forbids fused multiply-adds, ``-fno-fast-math`` reassociation.
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("fused_take.cpp")
FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-fast-math")
BUILD_TIMEOUT_S = 300
"""A compiler that takes longer than this is stopped; a healthy build takes seconds."""


def levels() -> dict[str, tuple[str, ...]]:
    """The libraries built on this architecture: level name → its extra flags (baseline first)."""
    if platform.machine().lower() in {"x86_64", "amd64"}:
        return {"base": ("-DOBIM_LEVEL=1",), "v3": ("-DOBIM_LEVEL=3", "-march=x86-64-v3")}
    return {"base": ("-DOBIM_LEVEL=1",)}


def library_name(level: str) -> str:
    """The file name of one level's library: ``fused_take_<level>.so``."""
    return f"{SOURCE.stem}_{level}.so"


class NativeBuildError(RuntimeError):
    """The compiler is missing, failed or took too long; the message says which and how to proceed."""


def compile_library(source: Path, target: Path, compiler: str, extra: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` into ``target``, which appears whole or not at all (a temporary file, renamed).

    Raises:
        NativeBuildError: the compiler cannot be run, rejects the source (its last lines are quoted)
            or runs longer than :data:`BUILD_TIMEOUT_S`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    command = [compiler, *FLAGS, *extra, str(source), "-o", partial]
    try:
        built = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if built.returncode != 0:
            tail = "\n".join(built.stderr.strip().splitlines()[-5:])
            raise NativeBuildError(f"{compiler} could not compile {source} (exit {built.returncode}):\n{tail}")
        os.chmod(partial, 0o755)  # mkstemp made it 0600; installed copies must be readable by every user
        os.replace(partial, target)
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"{compiler} took more than {BUILD_TIMEOUT_S} s to compile {source}") from None
    except OSError as exc:
        raise NativeBuildError(f"C++ compiler {compiler!r} cannot be run ({exc}); set CXX to a working one") from None
    finally:
        Path(partial).unlink(missing_ok=True)
    return target
