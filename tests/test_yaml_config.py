import pytest
import yaml

from obim_trainer.callback_config import OBIMConfig
from obim_trainer.config import MergeConfig
from obim_trainer.demo.config import DemoConfig
from obim_trainer.errors import ConfigError
from obim_trainer.evaluation import LmEvalConfig
from obim_trainer.merge_comparison import ComparisonConfig
from obim_trainer.yaml_config import YamlConfig, load_yaml_config

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
