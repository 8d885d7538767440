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


def _merge_file(path: Path) -> None:
    """As ``obim-merge-ckpts --config FILE`` reads it (MergeConfig and ComparisonConfig), inputs added."""
    from obim_trainer.cli import build_parser, config_from_args

    args = build_parser().parse_args(["--config", str(path), "--base", "b", "--checkpoints", "c", "--dry-run"])
    config, comparison = config_from_args(args)
    assert config.method in available_methods() and comparison.methods[0] == config.method


def _callback_example(path: Path) -> None:
    """As examples/continued_pretraining.py reads it: top level and data: keys, TrainingArguments keys,
    and obim: as OBIMConfig with the model folder as base (data files and bf16 need the real machine)."""
    from transformers import TrainingArguments

    from obim_trainer.settings.callback import OBIMConfig
    from obim_trainer.settings.yaml_files import EXAMPLE_DATA_KEYS, EXAMPLE_TOP_KEYS, check_keys, section_of

    settings = load_yaml_config(path)
    check_keys(settings, EXAMPLE_TOP_KEYS, str(path))
    check_keys(settings["data"], EXAMPLE_DATA_KEYS, section_of(path, "data"))
    check_keys(settings["training"], TrainingArguments.__dataclass_fields__, section_of(path, "training"))
    OBIMConfig.build({"base_model": settings["model"], **settings["obim"]}, source=section_of(path, "obim"))


def _demo(path: Path) -> None:
    from obim_trainer.demo.config import DemoConfig

    DemoConfig.from_yaml(path)


def _lm_eval(path: Path) -> None:
    from obim_trainer.evaluation import LmEvalConfig

    LmEvalConfig.from_yaml(path)


def _accelerate(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    load_config_from_file(str(path))


VALIDATORS = {
    "merge": _merge_file,
    "callback": _callback_example,
    "demo": _demo,
    "eval": _lm_eval,
    "accelerate": _accelerate,
}
"""The model each folder of configs/ configures, as the code that reads it validates it."""
SHIPPED = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_yaml_validates_against_the_model_it_configures(path):
    assert path.parent.name in VALIDATORS, f"{path}: add the model it configures to VALIDATORS"
    VALIDATORS[path.parent.name](path)
