"""The benchmark scripts run end to end on tiny sizes and print every row they promise, with sane numbers.

``statistics_cost.py`` and ``merge_speed.py`` time each pass or merge in fresh processes (about 20 s and
50 s here, mostly Python and torch start-up), so those two tests are ``slow``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_script(name: str, *args: str) -> str:
    """The script's stdout; its stderr in the failure message."""
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    out = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def rows(stdout: str) -> dict[str, list[str]]:
    """First column -> the other columns, for every whitespace-separated table line."""
    return {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.strip()}


def test_regmean_solve_times_each_size_and_says_when_there_is_no_gpu() -> None:
    import torch

    stdout = run_script("regmean_solve.py", "--sizes", "32,48", "--out", "16")
    table = rows(stdout)
    for size in (32, 48):
        device, seconds = table[f"{size}x{size}"][:2]
        assert device == "cpu" and 0 <= float(seconds.rstrip("s")) < math.inf
    assert ("no GPU" in stdout) == (not torch.cuda.is_available())


@pytest.mark.slow
def test_statistics_cost_prints_ratios_for_every_pass() -> None:
    tiny = ["--hidden", "64", "--layers", "1", "--vocab", "128", "--samples", "4", "--max-length", "16"]
    table = rows(run_script("statistics_cost.py", *tiny, "--kinds", "grams,fishers"))
    assert table["pass"] == ["seconds", "/train", "peak", "MB", "/weights"]
    assert float(table["train"][1]) == 1.0
    for kind in ("train", "grams", "fishers"):
        seconds, ratio, peak_mb, per_weight = map(float, table[kind])
        assert seconds > 0 and ratio > 0 and math.isfinite(ratio), table[kind]
        assert peak_mb >= 0 and math.isfinite(per_weight), table[kind]


@pytest.mark.slow
def test_merge_speed_prints_a_row_per_statistics_method() -> None:
    tiny = ["--hidden", "64", "--intermediate", "128", "--layers", "1", "--vocab", "256", "--k", "2"]
    stdout = run_script("merge_speed.py", *tiny, "--workers", "1", "--repeats", "1", "--no-mergekit")
    expected = [
        "obim (1 worker)",
        "regmean seq. with stats",
        "regmean non-seq. cached",
        "regmean non-seq. with stats",
        "fisher_merging cached",
        "fisher_merging with stats",
    ]
    lines = {name: line for line in stdout.splitlines() for name in expected if line.startswith(name + " ")}
    assert sorted(lines) == sorted(expected), stdout
    for name, line in lines.items():
        seconds, ratio = line[len(name) :].split()[:2]
        assert float(seconds.rstrip("s")) > 0 and 0 < float(ratio) < math.inf, line


@pytest.mark.slow
def test_gram_memory_prints_each_merge_s_peak_against_obim() -> None:
    stdout = run_script("gram_memory.py", "--hidden", "128", "--layers", "1", "--vocab", "256", "--k", "2")
    lines = {line[:16].strip(): line[16:].split() for line in stdout.splitlines()[-3:]}
    assert sorted(lines) == ["obim", "regmean", "regmean cached"], stdout
    assert float(lines["obim"][2]) == 1.0
    for seconds, peak_mb, ratio in lines.values():
        assert float(seconds) > 0 and float(peak_mb) > 0 and 0 < float(ratio) < math.inf, stdout
