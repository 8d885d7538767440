"""OBIMConfig from Python and YAML, the merge it describes, and the shipped example configurations."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest
import yaml

from obim_trainer.errors import CheckpointError, ConfigError
from obim_trainer.settings.callback import CALLBACK_NAMES, CHOSEN_BY_CALLBACK, OBIMConfig
from obim_trainer.settings.merge import MergeConfig
from obim_trainer.training.callback import OBIMCallback

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "configs" / "callback" / "example.yaml"


def test_example_yaml_holds_a_valid_callback_section():
    settings = yaml.safe_load(EXAMPLE.read_text())
    # as examples/continued_pretraining.py reads it: the model folder is the merge base
    config = OBIMConfig.build({"base_model": settings["model"], **settings["obim"]})
    assert (config.select_metric, config.top_k, config.method) == ("eval_ja_loss", 3, "obim")
    assert config.merge_every_saves == 5


def test_example_training_section_is_trainer_arguments():
    from transformers import TrainingArguments

    settings = yaml.safe_load(EXAMPLE.read_text())
    unknown = set(settings["training"]) - set(TrainingArguments.__dataclass_fields__)
    assert not unknown
    # eval_steps == save_steps: each checkpoint has the Trainer's per-language metric to be selected by
    assert settings["training"]["eval_steps"] == settings["training"]["save_steps"]
    assert set(settings["data"]["eval"]) == {"en", "zh", "ja"}


def test_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="top_kk"):
        OBIMConfig.build({"base_model": "base", "top_kk": 3})
    with pytest.raises(ConfigError, match="min_checkpoints=4 exceeds top_k=3"):
        OBIMConfig.build({"base_model": "base", "min_checkpoints": 4})
    with pytest.raises(ConfigError, match="no 'obim:' mapping"):
        OBIMConfig.from_yaml(_write(tmp_path, {"base_model": "base"}), section="obim")
    nested = OBIMConfig.from_yaml(_write(tmp_path, {"obim": {"base_model": "base", "top_k": 2}}), section="obim")
    assert nested.top_k == 2


def test_merge_config_is_the_offline_merge_of_the_same_settings(tmp_path):
    config = OBIMConfig.from_yaml(
        _write(tmp_path, {"base_model": "base", "calibration_data": "c.jsonl", "params": {"order": "given"}, "seed": 7})
    )
    merge = config.merge_config([Path("a"), Path("b")], tmp_path / "out")
    assert (merge.base, merge.checkpoints, merge.output) == (Path("base"), [Path("a"), Path("b")], tmp_path / "out")
    assert (merge.method, merge.params, merge.calibration_data, merge.seed) == (
        "obim",
        {"order": "given"},
        "c.jsonl",
        7,
    )
    assert not merge.dry_run and merge.overwrite
    assert config.merge_config([Path("a")], None).dry_run


def test_deepspeed_zero3_config_leaves_consolidation_to_the_callback():
    ds = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # the Trainer fills in its own values


@pytest.mark.parametrize(
    ("name", "kind", "processes"),
    [("single_process", "NO", 1), ("multi_process", "MULTI_GPU", 8), ("deepspeed_zero3", "DEEPSPEED", 8)],
)
def test_accelerate_configs_load(name, kind, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert (config.distributed_type.value, config.num_processes) == (kind, processes)
    if kind == "DEEPSPEED":
        assert (ROOT / config.deepspeed_config["deepspeed_config_file"]).is_file()


def _write(folder: Path, data: dict) -> Path:
    path = folder / "obim.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("error", "traceback_logged"),
    [(ZeroDivisionError("division by zero"), True), (CheckpointError("checkpoint-4 is corrupt; re-save it"), False)],
)
def test_on_error_warn_logs_the_traceback_of_a_bug_not_of_a_users_error(tmp_path, caplog, error, traceback_logged):
    callback = OBIMCallback(OBIMConfig.build({"base_model": tmp_path, "on_error": "warn"}))

    def step() -> None:
        raise error

    with caplog.at_level(logging.ERROR, logger="obim_trainer.training.callback"):
        assert callback._guarded(step, "the merge at step 4") is None
    assert f"the merge at step 4 failed, training goes on: {error}" in caplog.text
    assert ("Traceback (most recent call last)" in caplog.text) is traceback_logged


def test_an_unknown_key_in_a_section_names_the_file_the_section_and_the_key(tmp_path):
    path = _write(tmp_path, {"obim": {"base_model": "base", "top_kk": 2}})
    with pytest.raises(ConfigError, match=r"obim\.yaml, section 'obim:'.*top_kk: Extra inputs are not permitted"):
        OBIMConfig.from_yaml(path, section="obim")


def test_the_example_names_a_training_key_the_installed_transformers_does_not_accept(tmp_path, caplog):
    """``overwrite_output_dir`` was removed in transformers 5: one error line, not a TypeError traceback."""
    spec = importlib.util.spec_from_file_location("continued_pretraining", ROOT / "examples/continued_pretraining.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    settings = yaml.safe_load(EXAMPLE.read_text())
    settings["training"] |= {"output_dir": str(tmp_path / "run"), "overwrite_output_dir": True}
    config = _write(tmp_path, settings)
    with caplog.at_level(logging.ERROR, logger="continued_pretraining"):
        assert example.main(["--config", str(config)]) == 2
    assert f"{config}, section 'training:': TrainingArguments does not accept 'overwrite_output_dir'" in caplog.text
    assert "Traceback" not in caplog.text


def test_every_merge_setting_is_settable_from_the_callback_or_chosen_by_it():
    """One declaration per setting: the callback's field is the merge's (annotation, bounds, choices,
    description, default), except the callback's own selection and the defaults it states for itself."""
    selection = {"top_k", "metric"}  # the callback's: how many and by what it selects, always set
    own_defaults = {"stats_beside_checkpoints"}  # True: the run's own checkpoints, in its output folder
    for name, field in MergeConfig.model_fields.items():
        callback_name = CALLBACK_NAMES.get(name, name)
        if callback_name not in OBIMConfig.model_fields:
            assert name in CHOSEN_BY_CALLBACK, f"{name} is neither settable from OBIMConfig nor chosen by it"
            continue
        if name in selection:
            continue
        callback_field = OBIMConfig.model_fields[callback_name]
        assert (callback_field.annotation, callback_field.metadata) == (field.annotation, field.metadata), name
        assert callback_field.description == field.description or name == "base", name
        if name not in own_defaults:
            default = field.get_default(call_default_factory=True)
            assert callback_field.get_default(call_default_factory=True) == default, name


def test_the_merge_of_the_callback_carries_every_merge_setting(tmp_path):
    values = {
        "new_rows": "average",
        "zero_weights": "master",
        "stats_cache_dir": str(tmp_path / "stats"),
        "recompute_stats": True,
        "workers": 2,
        "select_mode": "max",
        "select_metric": "eval_acc",
        "merge_device": "cpu",
        "dtype": "bfloat16",
        "stats_beside_checkpoints": False,
        "calibration_batch_size": 3,
    }
    merge = OBIMConfig.build({"base_model": "base", **values}).merge_config([Path("a")], tmp_path / "out")
    assert (merge.new_rows, merge.zero_weights, merge.stats_cache_dir) == ("average", "master", tmp_path / "stats")
    assert (merge.recompute_stats, merge.workers, merge.metric_mode, merge.metric) == (True, 2, "max", "eval_acc")
    assert (merge.dtype, merge.stats_beside_checkpoints, merge.calibration_batch_size) == ("bfloat16", False, 3)
    assert (merge.progress, merge.overwrite, merge.run_dir, merge.top_k) == (False, True, None, None)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("checkpoints", "checkpoints is chosen by the callback (the callback merges the top_k checkpoints"),
        ("output", "output is chosen by the callback (merges are written to output_dir/<output_subdir>"),
        ("dry_run", "dry_run is chosen by the callback"),
        ("device", "device is called merge_device in the callback's settings; rename it"),
        ("metric_mode", "metric_mode is called select_mode in the callback's settings; rename it"),
    ],
)
def test_a_setting_the_callback_chooses_is_refused_with_the_reason(tmp_path, key, message):
    path = _write(tmp_path, {"obim": {"base_model": "base", key: "x"}})
    with pytest.raises(ConfigError, match=rf"obim\.yaml, section 'obim:'.*{re.escape(message)}"):
        OBIMConfig.from_yaml(path, section="obim")
