"""The README's configuration reference is the one the settings blocks generate."""

from __future__ import annotations

from pathlib import Path

from obim_trainer.settings.callback import OBIMConfig
from obim_trainer.settings.comparison import ComparisonConfig
from obim_trainer.settings.merge import MergeConfig
from obim_trainer.settings.reference import END, START, reference_table

README = Path(__file__).parents[2] / "README.md"


def test_the_readme_holds_the_generated_reference():
    text = README.read_text()
    assert START in text and END in text
    held = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert held == reference_table(), "regenerate it: python -m obim_trainer.settings.reference"


def test_the_reference_lists_every_setting_of_every_configuration():
    rows = {line.split("|")[1].strip().strip("`") for line in reference_table().splitlines()[2:]}
    for model in (MergeConfig, ComparisonConfig, OBIMConfig):
        missing = set(model.model_fields) - rows - {"base_model", "merge_device", "select_mode", "total_share_sweep"}
        assert not missing, f"{model.__name__}: {missing}"
