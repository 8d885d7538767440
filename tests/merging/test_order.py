"""Merge orders: O^{l+1} = LR(O^l, 1) by decoder block, a fixed order, or explicit priorities."""

from __future__ import annotations

import pytest

from obim_trainer.errors import ConfigError
from obim_trainer.merging.order import merge_order


def test_rotation_shifts_left_by_one_per_block():
    assert [merge_order(3, block) for block in range(5)] == [
        [0, 1, 2],
        [1, 2, 0],
        [2, 0, 1],
        [0, 1, 2],
        [1, 2, 0],
    ]
    assert merge_order(3, None) == [0, 1, 2], "tensors outside blocks use the given order"
    assert merge_order(4, 6) == [2, 3, 0, 1]
    assert merge_order(1, 7) == [0]


def test_rotation_is_a_permutation_whose_first_cycles_through_every_checkpoint():
    for k in range(1, 7):
        firsts = []
        for block in range(2 * k):
            order = merge_order(k, block)
            assert sorted(order) == list(range(k))
            assert all(order[(i + 1) % k] == (order[i] + 1) % k for i in range(k)), "a rotation keeps neighbours"
            firsts.append(order[0])
        assert firsts == [b % k for b in range(2 * k)]


def test_given_ignores_the_block():
    assert all(merge_order(3, block, "given") == [0, 1, 2] for block in (None, 0, 1, 2, 9))


def test_priority_sorts_descending_with_ties_by_index():
    assert merge_order(3, 7, "priority", [0.1, 5, 1]) == [1, 2, 0]
    assert merge_order(3, None, "priority", [1, 1, 0]) == [0, 1, 2]
    assert merge_order(4, 2, "priority", [2, 3, 3, -1]) == [1, 2, 0, 3]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((0, None), "at least one checkpoint"),
        ((3, 1, "sideways"), "unknown merge order 'sideways'; choose one of rotation, given, priority"),
        ((3, 1, "priority"), "one finite priority per checkpoint (3), got None"),
        ((3, 1, "priority", [1, 2]), "got [1, 2]"),
        ((2, 1, "priority", [1, float("nan")]), "finite"),
        ((2, 1, "rotation", [1, 2]), "only used with order 'priority'"),
        ((2, 1, "given", [1, 2]), "only used with order 'priority'"),
    ],
)
def test_invalid_orders_are_config_errors(args, fragment):
    with pytest.raises(ConfigError) as info:
        merge_order(*args)
    assert fragment in str(info.value)
