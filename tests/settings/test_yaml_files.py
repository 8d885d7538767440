import importlib.util
from pathlib import Path

import pytest
import yaml

from obim_trainer.demo.config import DemoConfig
from obim_trainer.errors import ConfigError
from obim_trainer.evaluation import LmEvalConfig
from obim_trainer.pipeline.compare import ComparisonConfig
from obim_trainer.settings.callback import OBIMConfig
from obim_trainer.settings.merge import MergeConfig
from obim_trainer.settings.yaml_files import YamlConfig, load_yaml_config

ROOT = Path(__file__).parents[2]
CONFIGS = [MergeConfig, ComparisonConfig, OBIMConfig, LmEvalConfig, DemoConfig]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_an_unknown_key_is_one_config_error_naming_the_file_and_the_key(config: type[YamlConfig], tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"not_a_setting": 1}))
    with pytest.raises(ConfigError) as err:
        config.from_yaml(path)
    message = str(err.value)
    assert message.startswith(f"invalid {config.described_as} {path}: ")
    assert "not_a_setting: Extra inputs are not permitted" in message
    assert "described_as" not in config.model_fields


def test_build_from_a_mapping_names_what_it_builds():
    with pytest.raises(ConfigError, match=r"^invalid comparison configuration: methods: "):
        ComparisonConfig.build({"methods": []})


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, "does not exist"), ("a: [1,", "is not valid YAML"), ("- 1\n- 2\n", "must hold a mapping")],
)
def test_unreadable_files_are_named(text, expected, tmp_path):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_yaml_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_a_mistyped_key_gets_the_closest_accepted_spelling(config: type[YamlConfig], tmp_path):
    field = max(config.model_fields, key=len)
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({field + "z": 1}))
    with pytest.raises(ConfigError) as err:
        config.from_yaml(path)
    assert f"{field}z: Extra inputs are not permitted (did you mean '{field}'?)" in str(err.value)


def test_an_unrelated_key_gets_no_suggestion():
    with pytest.raises(ConfigError) as err:
        MergeConfig.build({"qqqqqqqq": 1})
    assert "qqqqqqqq: Extra inputs are not permitted;" in str(err.value) + ";"
    assert "did you mean" not in str(err.value)


def _example():
    spec = importlib.util.spec_from_file_location("continued_pretraining", ROOT / "examples/continued_pretraining.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def _example_config(tmp_path, edit) -> Path:
    for name in ("train.jsonl", "en.jsonl"):
        (tmp_path / name).write_text('{"text": "hello"}\n')
    settings = {
        "model": str(tmp_path / "base"),
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": {"en": str(tmp_path / "en.jsonl")}},
        "training": {"output_dir": str(tmp_path / "run"), "use_cpu": True, "report_to": "none"},
    }
    edit(settings)
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda s: s["training"].update(save_step=5),
            "section 'training:': TrainingArguments does not accept 'save_step' (did you mean 'save_steps'?)",
        ),
        (
            lambda s: s["data"].update(block_siz=64),
            "section 'data:': unknown key(s) 'block_siz' (did you mean 'block_size'?)",
        ),
        (
            lambda s: s.update(resume_from_checkpiont="x"),
            "top level: unknown key(s) 'resume_from_checkpiont' (did you mean 'resume_from_checkpoint'?)",
        ),
        (
            lambda s: s["data"]["eval"].update(zh="typo.jsonl"),
            "section 'data:', key 'eval.zh': data file typo.jsonl does not exist",
        ),
    ],
    ids=["training", "data", "top", "data-file"],
)
def test_the_example_config_names_the_file_the_section_and_the_key(edit, expected, tmp_path):
    from transformers import TrainingArguments

    config = _example_config(tmp_path, edit)
    with pytest.raises(ConfigError) as err:
        _example().build_settings(config, TrainingArguments)
    assert str(err.value).startswith(f"{config}") or str(err.value).startswith(f"config {config}")
    assert expected in str(err.value)


def test_the_example_config_with_known_keys_builds(tmp_path):
    from transformers import TrainingArguments

    config = _example_config(tmp_path, lambda s: None)
    _, args, obim = _example().build_settings(config, TrainingArguments)
    assert args.output_dir == str(tmp_path / "run") and obim.eval_data is None  # merges: the Trainer on data.eval
