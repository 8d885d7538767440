"""Building and loading the native library: the install-time build, first-use builds under a lock, only
private cached files, clear failures, and the torch path as the fallback."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from obim_trainer._user_cache import CACHE_ENV
from obim_trainer.merging import native_library as native
from obim_trainer.merging.native.build import levels, library_name
from obim_trainer.merging.native_library import NativeBuildError, build_library

COMPILER = shutil.which("c++") or shutil.which("g++")
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler on this machine")


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """``native_library()`` as a new process sees it, with its cache in a temporary folder."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(native, "INSTALLED", tmp_path / "not-installed")  # as if setup.py could not build
    native.kernel_state.cache_clear()
    yield native.native_library
    native.kernel_state.cache_clear()


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
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".lock"], "nothing half-written in the cache"


@needs_compiler
def test_processes_starting_together_compile_once(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger=native.__name__), ThreadPoolExecutor(3) as pool:
        built = list(pool.map(lambda _: build_library(native.SOURCE, tmp_path, COMPILER), range(3)))
    assert len(set(built)) == 1
    assert sum("compiled" in r.getMessage() for r in caplog.records) == 1, "one compiled, the others waited"


def test_a_build_waits_for_the_lock_only_so_long(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "LOCK_TIMEOUT_S", 0.5)
    with (tmp_path / ".lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process compiling
        with pytest.raises(NativeBuildError, match=r"held .*\.lock for more than 0\.5 s.*delete the lock file"):
            build_library(native.SOURCE, tmp_path, COMPILER or "c++")


@needs_compiler
def test_a_cached_library_others_can_write_or_own_is_refused(tmp_path, fresh_library, monkeypatch, caplog):
    monkeypatch.setenv("CXX", COMPILER)  # the compiler the cache key names
    path = build_library(native.SOURCE, tmp_path / "kernels", COMPILER)
    path.chmod(0o775)
    with pytest.raises(NativeBuildError, match=r"writable by other users; delete it"):
        build_library(native.SOURCE, tmp_path / "kernels", COMPILER)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert fresh_library() is None, "loaded a library another user could have replaced"
    assert "writable by other users" in caplog.text and "slower torch path" in caplog.text
    assert native.kernel_state().to_dict()["path"] == "torch"
    path.chmod(0o755)
    if os.getuid() == 0:  # only root can give a file away
        os.chown(path, 12345, -1)
        with pytest.raises(NativeBuildError, match=r"belongs to user id 12345, not to this user"):
            build_library(native.SOURCE, tmp_path / "kernels", COMPILER)


@pytest.mark.slow
@needs_compiler
def test_installing_the_package_builds_every_level_into_the_package(tmp_path):
    """What ``pip install`` runs (setup.py's build_ext): plain libraries inside obim_trainer/merging/native."""
    root = Path(__file__).parents[2]
    built = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "build_ext",
            "--build-lib",
            str(tmp_path),
            "--build-temp",
            str(tmp_path / "t"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    folder = tmp_path / "obim_trainer" / "merging" / "native"
    assert sorted(p.name for p in folder.glob("*.so")) == sorted(library_name(level) for level in levels())
    for level in levels():
        library = native.load_library(folder / library_name(level))
        assert library.obim_build_level() == (1 if level == "base" else int(level.removeprefix("v")))
    assert native.load_library(folder / library_name("base")).obim_cpu_level() >= 1


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
    assert list((tmp_path / "kernels").glob("fused_take-base-*.so")), "built into $OBIM_CACHE_DIR/kernels"
    c = native.ctypes
    scores = (c.c_float * 5)(3.0, 9.0, 1.0, 7.0, 5.0)
    threshold, low, need = (c.c_float * 1)(), (c.c_float * 1)(), (c.c_int64 * 1)()
    status, count, num_free, no_mask = (c.c_int * 1)(), (c.c_int64 * 1)(2), (c.c_int64 * 1)(5), (c.c_void_p * 1)()
    invalid = library.obim_select(
        scores,
        None,
        None,
        None,
        0,
        0,
        0,
        5,
        1,
        1,
        1,
        no_mask,
        count,
        num_free,
        100,
        threshold,
        low,
        need,
        status,
        1,
    )  # given scores, 5 rows of 1, every position sampled: take what lies above 7's bin (9), then 1 from it (7)
    assert (invalid, status[0], need[0]) == (0, 0, 1)
    assert 7.0 < threshold[0] <= 9.0 and low[0] <= 7.0 < threshold[0] and low[0] > 5.0
    result, free_out = (c.c_float * 5)(*[42.0] * 5), (c.c_uint8 * 5)()  # uninitialised: prev fills it
    prev = (c.c_float * 5)(-1.0, -2.0, -3.0, -4.0, -5.0)
    library.obim_take_many(
        scores,
        scores,
        None,
        None,
        0,
        0,
        0,
        1,
        1,
        no_mask,
        (c.c_void_p * 1)(c.addressof(free_out)),
        threshold,
        low,
        need,
        (c.c_void_p * 1)(c.addressof(result)),
        (c.c_void_p * 1)(c.addressof(prev)),
        5,
        1,
        4,
        1,
    )  # copies the scores themselves into result where taken, prev's values elsewhere
    assert list(result) == [-1.0, 9.0, -3.0, 7.0, -5.0] and list(free_out) == [1, 0, 1, 0, 1]
    assert library.obim_all_finite(scores, 5, 4, 0x7F800000) == 1


@needs_compiler
def test_a_library_built_from_an_older_source_is_refused_by_name(tmp_path):
    older = tmp_path / "fused_take.cpp"
    older.write_text('extern "C" int obim_cpu_level() { return 1; }\n')  # lacks every later function
    path = build_library(older, tmp_path / "out", COMPILER)
    with pytest.raises(OSError, match=r"has no obim_select: it was built from an older source"):
        native.load_library(path)
