"""Picking the top-k checkpoints of a Trainer run from trainer_state.json."""

from __future__ import annotations

import json

import pytest

from obim_trainer.errors import CheckpointError, ConfigError
from obim_trainer.training.run_dir import resolve_mode, select_top_checkpoints


def make_run(tmp_path, steps, history, state_in="run"):
    run = tmp_path / "run"
    for s in steps:
        (run / f"checkpoint-{s}").mkdir(parents=True)
    target = run if state_in == "run" else run / f"checkpoint-{max(steps)}"
    (target / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return run


def test_lowest_loss_first_and_ties_go_to_the_later_step(tmp_path):
    run = make_run(
        tmp_path,
        [100, 200, 300, 400],
        [
            {"step": 100, "eval_ja_loss": 2.0},
            {"step": 200, "eval_ja_loss": 1.0},
            {"step": 300, "eval_ja_loss": 1.0},
            {"step": 400, "eval_ja_loss": 1.5},
            {"step": 400, "loss": 0.1},
        ],
    )
    chosen = select_top_checkpoints(run, "eval_ja_loss", 3)
    assert [c.step for c in chosen] == [300, 200, 400]


def test_higher_is_better_for_accuracy_and_explicit_mode(tmp_path):
    run = make_run(
        tmp_path, [1, 2, 3], [{"step": s, "eval_acc": v} for s, v in [(1, 0.2), (2, 0.9), (3, 0.5)]], state_in="ckpt"
    )
    assert [c.step for c in select_top_checkpoints(run, "eval_acc", 2)] == [2, 3]
    assert [c.step for c in select_top_checkpoints(run, "eval_acc", 1, mode="min")] == [1]
    assert resolve_mode("eval_zh_perplexity", "auto") == "min"


def test_checkpoints_without_the_metric_are_not_candidates(tmp_path):
    run = make_run(tmp_path, [1, 2, 3], [{"step": 1, "eval_loss": 3.0}, {"step": 3, "eval_loss": 2.0}])
    assert [c.step for c in select_top_checkpoints(run, "eval_loss", 2)] == [3, 1]
    with pytest.raises(ConfigError, match="only 2 checkpoint"):
        select_top_checkpoints(run, "eval_loss", 3)


def test_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        select_top_checkpoints(tmp_path / "missing", "eval_loss", 1)
    run = make_run(tmp_path, [1], [{"step": 1, "eval_loss": 3.0}])
    with pytest.raises(ConfigError, match="no 'eval_ja_loss'"):
        select_top_checkpoints(run, "eval_ja_loss", 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint-N"):
        select_top_checkpoints(tmp_path / "empty", "eval_loss", 1)


def test_a_deleted_checkpoint_is_read_from_its_protected_copy(tmp_path, caplog):
    """``save_total_limit`` deleted checkpoint-100; the callback's copy in obim/selected/ is what is read."""
    history = [{"step": s, "eval_ja_loss": v} for s, v in [(100, 0.5), (200, 1.0), (300, 2.0)]]
    run = make_run(tmp_path, [200, 300], history)
    for step in (100, 200):  # 200 still exists: its original is read
        (run / "obim" / "selected" / f"checkpoint-{step}").mkdir(parents=True)
    with caplog.at_level("INFO", logger="obim_trainer.training.run_dir"):
        chosen = select_top_checkpoints(run, "eval_ja_loss", 2)
    assert [c.path for c in chosen] == [run / "obim" / "selected" / "checkpoint-100", run / "checkpoint-200"]
    assert all(c.path.is_dir() for c in chosen)
    assert f"reading 1 checkpoint(s) from {run / 'obim' / 'selected'}" in caplog.text
