"""Teardown of a real gloo process group with a DDP model: the reducer is released before the group goes,
on success and on failure (a world of one, in this process, so nothing outlives the test)."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from obim_trainer.distributed.teardown import process_group_teardown


def train_one_step(init_file: Path, seen: list[weakref.ref], fail: bool) -> None:
    """One DDP step on a fresh process group; ``seen`` gets a weak reference to the wrapped model."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    model(torch.ones(3, 4)).sum().backward()
    seen.append(weakref.ref(model))
    if fail:
        raise RuntimeError("the training step failed")


def test_the_model_is_released_and_the_group_destroyed(tmp_path):
    seen: list[weakref.ref] = []
    with process_group_teardown():
        train_one_step(tmp_path / "init", seen, fail=False)
    assert seen[0]() is None, "the DDP model (and its reducer) outlived the teardown"
    assert not dist.is_initialized()


def test_a_failure_releases_the_model_while_its_error_is_still_raised(tmp_path):
    seen: list[weakref.ref] = []
    try:
        with process_group_teardown():
            train_one_step(tmp_path / "init", seen, fail=True)
    except RuntimeError as error:  # the traceback is alive here and must not keep the model
        assert "the training step failed" in str(error)
        assert seen[0]() is None, "the failed run's frames kept the DDP model through the teardown"
    else:
        pytest.fail("the error was swallowed")
    assert not dist.is_initialized()
