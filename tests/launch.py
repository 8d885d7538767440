"""Starting multi-process runs from tests: ``torch.distributed.run`` on a free port, in its own session.

DeepSpeed's CPU communication keys its shared memory on the master address and port, so the
port must be a real one (``--master_port 0`` or ``--standalone`` can hang it). A port found free
can be taken by another process before the launcher binds it, so :func:`run_on_free_port` starts
again on a new port when the launch failed for that reason. A run gets its own process session so
that a timeout kills its ranks too, not only the launcher, and writes its whole log to a file of
its own (runs in parallel or one after the other never overwrite each other's).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
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


def torchrun(nproc: int, port: int) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` local processes on ``port``."""
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
        str(port),
    ]


def run_env(**extra: str) -> dict[str, str]:
    """The environment of a launched run: this checkout importable, one thread per rank (2 cores)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # faulthandler: a rank that aborts in native code prints every thread's Python stack
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **extra}


def run_isolated(argv: list[str], env: dict[str, str], timeout: float, log: Path) -> tuple[int, str]:
    """Run a command in its own session; on timeout kill its whole process group (launchers leave
    their workers behind otherwise). The whole of stdout + stderr goes to ``log``; returns the exit
    status (-1 on timeout) and the output's tail, which names ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = -1
    output = log.read_text(errors="replace")
    header = f"timed out after {timeout} s; " if status == -1 else ""
    return status, f"{header}whole log: {log}\n{output[-8000:]}"


PORT_TAKEN = ("address already in use", "eaddrinuse")


def run_on_free_port(
    argv_for: Callable[[int], list[str]], env: dict[str, str], timeout: float, log: Path, attempts: int = 3
) -> tuple[int, str]:
    """:func:`run_isolated` of ``argv_for(port)`` on a free port, started again on another port (up to
    ``attempts`` times) when the launch failed because someone else took the port in between."""
    for _ in range(attempts - 1):
        status, output = run_isolated(argv_for(free_port()), env, timeout, log)
        if status == 0 or not any(sign in log.read_text(errors="replace").lower() for sign in PORT_TAKEN):
            return status, output
    return run_isolated(argv_for(free_port()), env, timeout, log)
