"""Per-checkpoint parameters: one number for all or exactly one per checkpoint."""

from __future__ import annotations

import pytest

from obim_trainer.errors import ConfigError
from obim_trainer.merging.per_model import check_fractions, per_model


def test_a_number_is_broadcast_and_a_list_is_kept():
    assert per_model(0.5, 3, "density", "ties") == [0.5, 0.5, 0.5]
    assert per_model(2, 2, "weight", "ties") == [2.0, 2.0]
    assert per_model([0.1, 0.2], 2, "density", "ties") == [0.1, 0.2]


def test_a_list_of_the_wrong_length_names_the_parameter_and_the_fix():
    with pytest.raises(ConfigError, match=r"ties: density has 2 value\(s\).*3 checkpoints.*one per checkpoint"):
        per_model([0.1, 0.2], 3, "density", "ties")


def test_fractions_outside_zero_one_are_rejected():
    check_fractions([0.0, 1.0, 0.5], "density", "dare_linear")
    with pytest.raises(ConfigError, match=r"dare_linear: every density must lie in \[0, 1\]"):
        check_fractions([0.5, 1.5], "density", "dare_linear")
