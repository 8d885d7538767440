"""Every YAML in configs/merge/ loads, names a method and builds it."""

from __future__ import annotations

from pathlib import Path

import pytest

from obim_trainer.merging import available_methods, build_method
from obim_trainer.yaml_config import load_yaml_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "merge").glob("*.yaml"))


def test_one_config_per_method():
    names = {load_yaml_config(p)["method"] for p in CONFIGS}
    assert names == set(available_methods())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_its_method(path):
    data = load_yaml_config(path)
    method_cls = available_methods()[data["method"]]
    k = method_cls.max_models or 3
    method = build_method(data["method"], data.get("params"), num_models=k)
    assert method.describe()["method"] == data["method"]


def test_sft_setting_is_table_8():
    params = load_yaml_config(Path(__file__).parents[1] / "configs/merge/obim_sft.yaml")["params"]
    assert params == {"ratios": [0.4, 0.45, 0.1], "order": "given"}
