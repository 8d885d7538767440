"""Building and loading the native library: cached builds, clear failures, and the torch path as the fallback."""

from __future__ import annotations

import logging
import shutil

import pytest

from obim_trainer.merging import native_library as native
from obim_trainer.merging.native_library import NativeBuildError, build_library
from obim_trainer.user_cache import CACHE_ENV

COMPILER = shutil.which("c++") or shutil.which("g++")
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler on this machine")


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """``native_library()`` as a new process sees it, with its cache in a temporary folder."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    native.native_library.cache_clear()
    yield native.native_library
    native.native_library.cache_clear()


@needs_compiler
def test_a_build_is_cached_by_source_and_reused(tmp_path):
    first = build_library(native.SOURCE, tmp_path, COMPILER)
    built_at = first.stat().st_mtime_ns
    assert build_library(native.SOURCE, tmp_path, COMPILER) == first
    assert first.stat().st_mtime_ns == built_at, "the second call compiled again"
    changed = tmp_path / "src" / native.SOURCE.name
    changed.parent.mkdir()
    changed.write_text(native.SOURCE.read_text() + "\n// changed\n")
    assert build_library(changed, tmp_path, COMPILER) != first
    assert not list(tmp_path.glob(".*.tmp")), "no partial file is left behind"


@needs_compiler
def test_a_source_the_compiler_rejects_is_one_error_quoting_it(tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("int f( {\n")
    with pytest.raises(NativeBuildError, match=r"could not compile .*broken\.cpp") as raised:
        build_library(broken, tmp_path / "out", COMPILER)
    assert "error" in str(raised.value)
    assert not list((tmp_path / "out").iterdir()), "nothing half-written in the cache"


def test_a_missing_compiler_is_named(tmp_path):
    with pytest.raises(NativeBuildError, match=r"'/nonexistent/c\+\+' cannot be run.*set CXX"):
        build_library(native.SOURCE, tmp_path, "/nonexistent/c++")


def test_without_a_working_compiler_the_torch_path_is_used_and_said_once(fresh_library, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert fresh_library() is None
        assert fresh_library() is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "slower torch path" in warnings[0] and "CXX" in warnings[0]


def test_the_native_path_can_be_switched_off(fresh_library, monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert fresh_library() is None


@needs_compiler
def test_the_library_loads_with_its_functions_typed(fresh_library, tmp_path):
    library = fresh_library()
    assert library is not None
    assert list((tmp_path / "kernels").glob("fused_take-*.so")), "built into $OBIM_CACHE_DIR/kernels"
    values = (native.ctypes.c_float * 5)(3.0, 9.0, 1.0, 7.0, 5.0)
    assert library.obim_kth_largest(values, 5, 2) == 7.0
