"""Every YAML in configs/merge/ loads, names a method and builds it."""

from __future__ import annotations

from pathlib import Path

import pytest

from obim_trainer.merging import available_methods, build_method
from obim_trainer.settings.yaml_files import load_yaml_config

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


@pytest.mark.parametrize("name", ["regmean", "fisher_merging", "lines", "magmax"])
def test_new_method_configs_hold_the_defaults(name):
    data = load_yaml_config(Path(__file__).parents[1] / "configs" / "merge" / f"{name}.yaml")
    method = build_method(name, data["params"], num_models=3)
    assert method.params == build_method(name, {}, num_models=3).params


def test_forgetting_aware_obim_config_reads_fishers():
    data = load_yaml_config(Path(__file__).parents[1] / "configs" / "merge" / "obim_forgetting_aware.yaml")
    needs = build_method(data["method"], data["params"], num_models=3).statistics()
    assert needs.fishers and needs.per_language and not needs.activations
