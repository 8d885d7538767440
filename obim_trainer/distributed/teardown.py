"""Ending a multi-process run so that its processes exit, on success and on failure.

A process group left to interpreter exit is destroyed while DDP's reducer or the DeepSpeed engine
still references it: gloo's threads then wait for the GIL the exiting main thread holds (a hang), or
are destroyed while still running ("terminate called without an active exception", an abort). Both
were seen in two-process runs after every output had been written (pytorch/pytorch#190489).

The cure is an order: drop the trainer, model and engine, collect the garbage they leave in
reference cycles (the reducer goes with them), wait for every rank (only when this one is healthy: a
failed rank must not wait for peers that may never arrive) and destroy the group, all before the
interpreter starts to exit. :func:`process_group_teardown` does that around the code that holds them.
"""

from __future__ import annotations

import gc
import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)


def end_process_group(*, healthy: bool) -> None:
    """Collect garbage, wait for every rank if ``healthy``, then destroy the default process group.

    Without a process group only the garbage is collected, so single-process runs can call it too.
    """
    gc.collect()  # a released DDP reducer or DeepSpeed engine sits in reference cycles; free it first
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    try:
        if healthy:
            torch.distributed.barrier()  # no rank destroys the group while another still uses it
    finally:
        torch.distributed.destroy_process_group()


@contextmanager
def process_group_teardown() -> Iterator[None]:
    """Run the body, then :func:`end_process_group`, on success and on failure.

    The body should build its trainer, model or engine inside a function it calls, so that nothing
    outside that function's frame keeps them: on success the frame is gone; on failure the frames the
    exception passed through are cleared (the traceback still prints, without their local variables).
    """
    healthy = False
    try:
        yield
        healthy = True
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the traceback would keep the trainer alive otherwise
        raise
    finally:
        end_process_group(healthy=healthy)
