"""The 0.1 import paths still work for one release, as the same module, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import sys

import pytest

from obim_trainer._moved import MOVED


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_an_old_import_path_is_the_new_module_and_warns(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_the_old_paths_are_not_files_any_more():
    for old in MOVED:
        assert importlib.util.find_spec(old).origin is None, old
