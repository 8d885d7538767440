"""Starting multi-process runs from tests: ``torch.distributed.run`` on a free port, in its own session.

DeepSpeed's CPU communication keys its shared memory on the master address and port, so the
port must be a real one (``--master_port 0`` or ``--standalone`` can hang it). A run gets its own
process session so that a timeout kills its ranks too, not only the launcher.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def deepspeed_config(stage: int, *, gather_16bit: bool) -> dict:
    """A DeepSpeed config for a tiny CPU run at ZeRO-``stage``. Under ZeRO-3 every parameter is partitioned
    (without a zero threshold, parameters this small stay whole on every rank); ``gather_16bit`` decides
    whether saves also write 16-bit model weights."""
    zero: dict = {"stage": stage}
    if stage == 3:
        zero |= {"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": gather_16bit}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` local processes on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]


def run_env(**extra: str) -> dict[str, str]:
    """The environment of a launched run: this checkout importable, one thread per rank (2 cores)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # faulthandler: a rank that aborts in native code prints every thread's Python stack
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **extra}


def run_isolated(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run a command in its own session; on timeout kill its whole process group (launchers leave
    their workers behind otherwise). Returns the exit status and the tail of stdout + stderr."""
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return -1, f"timed out after {timeout} s\n{output[-8000:]}"
    (Path(tempfile.gettempdir()) / "obim-last-launch.log").write_text(output)  # the whole log, for a failure
    return proc.returncode, output[-8000:]
