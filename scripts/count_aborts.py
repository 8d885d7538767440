"""Run the two-process tests N times and print how many runs aborted or hung: ``aborts / runs``.

An exit that aborts or hangs now and then is not something one test run shows, so this is
evidence, not a test. Each repetition is one ``pytest`` process over the launched tests (each of
which starts two ranks) with its own temporary folder; a repetition counts as an abort when pytest
fails, and the launched runs' own logs (each run writes one, see tests/launch.py) are searched for
the signs of an abort or a hang, which are reported too.

    python scripts/count_aborts.py --runs 20                      # the default two-process tests
    python scripts/count_aborts.py --runs 5 tests/distributed/test_zero_callback.py
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
DEFAULT_TESTS = (  # one of each kind of launch, about two minutes a repetition on two busy cores
    "tests/distributed/test_accelerate_launch.py",  # the example under accelerate launch with DDP (it hung at exit)
    "tests/distributed/test_two_ranks.py",  # spawned gloo workers
    "tests/calibration/test_activation_stats.py::test_all_reduce_over_two_processes_equals_one_process",
    "tests/calibration/test_activation_stats.py::test_deepspeed_zero3_engine_with_partitioned_weights",
    # torchrun + DeepSpeed ZeRO-3 training with the callback (tests/distributed/zero_callback_run.py)
    "tests/distributed/test_zero_callback.py::test_the_run_ends_with_one_merge_loaded_into_the_partitioned_model",
)
ABORT_SIGNS = ("terminate called", "core dumped", "fatal python error", "timed out after")

logger = logging.getLogger("count_aborts")


def run_once(tests: list[str], folder: Path, timeout_s: float) -> tuple[bool, list[str]]:
    """One pytest run of ``tests`` in ``folder``: whether it passed, and the abort signs its logs show."""
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--basetemp", str(folder), *tests]
    log = folder.parent / f"{folder.name}.log"
    try:
        with log.open("w") as sink:
            status = subprocess.run(argv, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        return False, [f"pytest itself timed out after {timeout_s} s"]
    texts = [log.read_text(errors="replace"), *(p.read_text(errors="replace") for p in folder.rglob("*.log"))]
    signs = sorted({sign for text in texts for sign in ABORT_SIGNS if sign in text.lower()})
    return status == 0, signs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="*", default=list(DEFAULT_TESTS), help="pytest node ids (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=20, help="repetitions (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one repetition may take")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = Path(tempfile.mkdtemp(prefix="obim-aborts-"))
    aborts = 0
    for index in range(1, options.runs + 1):
        passed, signs = run_once(options.tests, root / f"run-{index}", options.timeout)
        aborts += not passed
        logger.info("run %d/%d: %s%s", index, options.runs, "ok" if passed else "FAILED", f" {signs}" if signs else "")
    logger.info("logs in %s", root)
    print(f"aborts / runs: {aborts} / {options.runs}")  # the one result, on stdout for the reader
    return 1 if aborts else 0


if __name__ == "__main__":
    sys.exit(main())
