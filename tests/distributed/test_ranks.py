"""Rank helpers in a single process: no process group, the launcher's RANK as the fallback."""

from __future__ import annotations

import pytest

from obim_trainer.distributed import (
    broadcast_object,
    is_distributed,
    is_main_process,
    max_over_ranks,
    rank,
    run_on_main,
    world_size,
)
from obim_trainer.errors import CheckpointError


def test_a_single_process_is_rank_0_of_1():
    assert (rank(), world_size(), is_distributed(), is_main_process()) == (0, 1, False, True)
    assert broadcast_object({"a": 1}) == {"a": 1}
    assert max_over_ranks(7) == 7


def test_the_launchers_rank_counts_without_a_process_group(monkeypatch):
    monkeypatch.setenv("RANK", "3")  # e.g. a CPU launch where TrainingArguments.process_index says 0
    assert rank() == 3 and not is_main_process()


def test_run_on_main_returns_or_raises_the_original_error():
    assert run_on_main(lambda: 41 + 1, "adding") == 42

    def broken() -> None:
        raise CheckpointError("checkpoint-4 is corrupt; re-save it")

    with pytest.raises(CheckpointError, match="checkpoint-4 is corrupt"):
        run_on_main(broken, "reading checkpoint-4")
