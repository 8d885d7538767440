"""The ``slow`` marker selects the tests that launch processes, so ``-m "not slow"`` is a quick run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
LAUNCHING = (
    "tests/distributed/test_accelerate_launch.py::",
    "tests/distributed/test_zero_callback.py::",
    "tests/distributed/test_two_ranks.py::",
    "tests/distributed/test_merge_on_ranks.py::",
    "tests/calibration/test_activation_stats.py::test_all_reduce_over_two_processes_equals_one_process",
    "tests/checkpoints/test_zero_reader.py::test_every_tensor_equals_deepspeeds_consolidation",
)


def collected(marker: str) -> list[str]:
    """The node ids ``pytest -m marker`` would run (collection only)."""
    argv = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", marker]
    env = {**os.environ, "OBIM_NATIVE_KERNELS": "0"}  # collection would otherwise compile the merge loops
    done = subprocess.run([*argv, "tests"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_slow_selects_every_launching_test_and_not_slow_none():
    slow, quick = collected("slow"), collected("not slow")
    for prefix in LAUNCHING:
        assert any(node.startswith(prefix) for node in slow), f"-m slow misses {prefix}"
        assert not any(node.startswith(prefix) for node in quick), f"-m 'not slow' runs {prefix}"
