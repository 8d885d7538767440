"""The names and shapes of what the callback records, independent of the backend."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from obim_trainer.tracking import Histogram, LayerSummary, NullLogger, RunLogger, Table
from obim_trainer.training.selectors import Candidate


class Recorder(RunLogger):
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def emit(self, step: int, values: Mapping) -> None:
        self.rows.append((step, dict(values)))


def candidate(step: int, **metrics: float) -> Candidate:
    return Candidate(step, Path(f"checkpoint-{step}"), metrics)


def test_checkpoint_and_merge_metrics_are_namespaced_on_their_step():
    log = Recorder()
    log.log_checkpoint(4, {"eval_ja_loss": 2.5, "obim_ja_perplexity": 12.0})
    log.log_merge(6, {"obim_en_loss": 3.0}, [candidate(4), candidate(6)])
    assert log.rows == [
        (4, {"obim/checkpoint/eval_ja_loss": 2.5, "obim/checkpoint/obim_ja_perplexity": 12.0}),
        (6, {"obim/merged/obim_en_loss": 3.0, "obim/merged/num_checkpoints": 2}),
    ]


def test_candidates_table_marks_the_selection_in_merge_order():
    log = Recorder()
    pool = [candidate(6, eval_ja_loss=1.0), candidate(2, eval_ja_loss=3.0, obim_en_loss=4.0), candidate(4)]
    log.log_candidates(6, pool, [pool[0], pool[2]])
    ((step, values),) = log.rows
    table = values["obim/candidates"]
    assert step == 6 and isinstance(table, Table)
    assert table.columns == ["step", "selected", "merge_rank", "eval_ja_loss", "obim_en_loss"]
    assert table.rows == [[2, False, None, 3.0, 4.0], [4, True, 2, None, None], [6, True, 1, 1.0, None]]


def test_merge_summary_becomes_histograms_shares_and_retained_fraction():
    layer = LayerSummary(
        numel=10,
        owned=[6, 3],
        log_saliency=[[torch.tensor([-2.0, -1.0, 0.0])], [torch.tensor([-1.5])]],
    )
    log = Recorder()
    log.log_merge_summary(8, {"mlp.up_proj": layer}, [candidate(8), candidate(6)], [0.55, 0.45], bins=4)
    ((_, values),) = log.rows
    first = values["obim/saliency/mlp.up_proj/ckpt-8"]
    assert isinstance(first, Histogram) and sum(first.counts) == 3 and first.edges == [-2.0, -1.5, -1.0, -0.5, 0.0]
    assert values["obim/saliency/mlp.up_proj/ckpt-6"].counts == [0, 1, 0, 0]  # the same bins for both
    assert values["obim/ownership/mlp.up_proj/ckpt-8"] == pytest.approx(0.6)
    assert values["obim/ownership/mlp.up_proj/ckpt-6"] == pytest.approx(0.3)
    assert values["obim/retained/mlp.up_proj"] == pytest.approx(0.9)
    assert values["obim/ownership/all/ckpt-6"] == 0.45


def test_timings_and_the_null_logger():
    log = Recorder()
    log.log_timings(2, {"statistics_s": 1.5})
    assert log.rows == [(2, {"obim/time/statistics_s": 1.5})]
    null = NullLogger()
    assert not null.enabled and log.enabled
    null.log_checkpoint(2, {"eval_loss": 1.0})  # records nothing, needs nothing
