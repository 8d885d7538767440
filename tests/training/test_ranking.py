"""One ranking by metric: ``--run-dir``, the callback's selector and ``new_rows='best'`` pick alike."""

from __future__ import annotations

import json
import math

import pytest

from obim_trainer.training.ranking import best_by_metric
from obim_trainer.training.run_dir import best_checkpoint, select_top_checkpoints
from obim_trainer.training.selectors import Candidate, TopKSelector

# ties (1.0 at 200 and 400), an unsorted step order and a diverged (NaN) evaluation
METRICS = {300: 2.5, 100: 1.0, 400: 1.0, 200: 3.0, 500: math.nan}


def run_with_states(tmp_path, metric: str, values: dict[int, float]):
    """``checkpoint-N`` folders whose own trainer_state.json logged ``metric`` at step N."""
    run = tmp_path / "run"
    for step, value in values.items():
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        state = {"global_step": step, "log_history": [{"step": step, metric: value}]}
        (folder / "trainer_state.json").write_text(json.dumps(state))
    return run


@pytest.mark.parametrize(("metric", "mode"), [("eval_ja_loss", "auto"), ("eval_acc", "auto"), ("eval_ja_loss", "max")])
def test_the_three_entry_points_pick_the_same_checkpoints(tmp_path, metric, mode):
    run = run_with_states(tmp_path, metric, METRICS)
    folders = [run / f"checkpoint-{step}" for step in METRICS]

    from_run = [c.step for c in select_top_checkpoints(run, metric, len(METRICS), mode)]
    pool = [Candidate(step, run / f"checkpoint-{step}", {metric: v}) for step, v in METRICS.items()]
    from_selector = [c.step for c in TopKSelector(metric, mode).select(pool, len(METRICS))]
    best = folders[best_checkpoint(folders, metric, mode)].name

    assert from_run == from_selector
    assert best == f"checkpoint-{from_run[0]}"
    assert from_run[-1] == 500  # NaN last, whichever the direction
    lower_first = metric.endswith("loss") and mode != "max"
    assert from_run[:4] == ([400, 100, 300, 200] if lower_first else [200, 300, 400, 100])


def test_ties_go_to_the_later_step_in_either_direction():
    items = [("a", 1.0, 1), ("b", 1.0, 3), ("c", 1.0, 2)]
    for mode in ("min", "max"):
        ranked = best_by_metric(items, lambda i: i[1], lambda i: i[2], "m", mode)
        assert [i[0] for i in ranked] == ["b", "c", "a"]
    assert best_by_metric(items, lambda i: i[1], lambda i: i[2], "m", "min", top_k=1) == [("b", 1.0, 3)]
