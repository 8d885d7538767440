"""Choosing the checkpoints to merge during training: top-k by a metric, newest, or a custom rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from obim_trainer.errors import ConfigError
from obim_trainer.training.selectors import (
    Candidate,
    LatestSelector,
    Selector,
    TopKSelector,
    build_selector,
    register_selector,
)


def candidates(values: dict[int, float | None], metric: str = "eval_ja_loss") -> list[Candidate]:
    return [
        Candidate(step, Path(f"run/checkpoint-{step}"), {} if v is None else {metric: v}) for step, v in values.items()
    ]


def test_lowest_loss_first_ties_to_the_later_step_and_unscored_ones_left_out():
    chosen = TopKSelector("eval_ja_loss").select(candidates({2: 3.0, 4: 1.0, 6: 1.0, 8: None, 10: 2.0}), 3)
    assert [c.step for c in chosen] == [6, 4, 10]


def test_higher_is_better_for_accuracy_unless_told_otherwise():
    pool = candidates({1: 0.2, 2: 0.9, 3: 0.5}, metric="eval_acc")
    assert [c.step for c in TopKSelector("eval_acc").select(pool, 2)] == [2, 3]
    assert [c.step for c in TopKSelector("eval_acc", "min").select(pool, 1)] == [1]


def test_latest_needs_no_metric():
    assert [c.step for c in LatestSelector().select(candidates({2: None, 6: None, 4: None}), 2)] == [6, 4]


def test_selectors_by_name_and_custom_ones():
    assert isinstance(build_selector("top_k", "eval_loss"), TopKSelector)
    with pytest.raises(ConfigError, match=r"unknown selector 'best'.*latest, top_k"):
        build_selector("best", "eval_loss")

    @register_selector
    class Oldest(Selector):
        name = "oldest_for_test"

        def __init__(self, metric: str, mode: str = "auto") -> None:
            self.metric = metric

        def select(self, pool, top_k):
            return sorted(pool, key=lambda c: c.step)[:top_k]

    built = build_selector("oldest_for_test", "eval_loss")
    assert [c.step for c in built.select(candidates({5: None, 3: None}), 1)] == [3]


def test_candidate_record_round_trip_and_merge_path(tmp_path):
    kept = tmp_path / "obim/selected/checkpoint-4"
    candidate = Candidate(4, tmp_path / "checkpoint-4", {"eval_loss": 1.5}, stats_key="ab" * 32, protected=kept)
    assert candidate.merge_path == kept
    assert not candidate.available
    kept.mkdir(parents=True)
    assert candidate.available
    assert Candidate.from_dict(candidate.to_dict()) == candidate
    candidate.protected = None
    assert candidate.merge_path == tmp_path / "checkpoint-4"
