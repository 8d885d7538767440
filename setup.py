"""Builds the native merge loops when the package is installed (metadata lives in pyproject.toml).

Each instruction-set level of ``obim_trainer/merging/native/fused_take.cpp`` becomes a plain shared
library inside the package (``native/fused_take_<level>.so``), loaded with ctypes, not imported: it
has no Python headers. Without a working C++ compiler the install still succeeds with a warning, and
the library is compiled on first use instead (see obim_trainer/merging/native_library.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

HERE = Path(__file__).resolve().parent
PACKAGE = "obim_trainer.merging.native"


def _load_build_module():
    """native/build.py by its path: importing the package would import torch, absent at build time."""
    spec = importlib.util.spec_from_file_location("obim_native_build", HERE / "obim_trainer/merging/native/build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NATIVE = _load_build_module()


class BuildNative(build_ext):
    """Compiles each level with :func:`compile_library` (the same flags as a first-use build)."""

    def get_ext_filename(self, fullname: str) -> str:
        return str(Path(*fullname.split("."))) + ".so"  # a plain library, no Python ABI tag

    def build_extension(self, ext: Extension) -> None:
        compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        if compiler is None:
            raise CompileError("no C++ compiler found (set CXX): the merge loops will be compiled on first use")
        target = Path(self.get_ext_fullpath(ext.name))
        try:
            NATIVE.compile_library(HERE / ext.sources[0], target, compiler, tuple(ext.extra_compile_args))
        except NATIVE.NativeBuildError as exc:
            raise CompileError(str(exc)) from None


setup(
    ext_modules=[
        Extension(
            f"{PACKAGE}.{Path(NATIVE.library_name(level)).stem}",
            sources=[str(NATIVE.SOURCE.relative_to(HERE))],
            extra_compile_args=list(flags),
            optional=True,  # a failed build is a warning; the first merge then compiles it
        )
        for level, flags in NATIVE.levels().items()
    ],
    cmdclass={"build_ext": BuildNative},
)
