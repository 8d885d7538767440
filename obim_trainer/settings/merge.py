"""The configuration of one offline merge, shared by the CLI, YAML files and the Python API.

A YAML file holds the same keys as :class:`MergeConfig` (``method``/``params`` as in
``configs/merge/*.yaml``); command-line flags override it key by key, and method
parameters given on the command line override ``params`` entry by entry.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, model_validator

from obim_trainer.settings.blocks import (
    CalibrationSettings,
    InputSettings,
    MethodSettings,
    OutputSettings,
)
from obim_trainer.settings.names import setting_name
from obim_trainer.settings.yaml_files import YamlConfig


class MergeConfig(InputSettings, CalibrationSettings, MethodSettings, OutputSettings, YamlConfig):
    """Everything ``obim-merge-ckpts`` needs (the blocks of :mod:`~obim_trainer.settings.blocks`).

    Paths are kept as given and resolved when used.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    described_as = "merge configuration"

    @model_validator(mode="after")
    def _one_way_to_choose_checkpoints(self) -> MergeConfig:
        if self.checkpoints and self.run_dir is not None:
            raise ValueError("give either checkpoints or run_dir (with top_k and metric), not both")
        if self.run_dir is not None and (self.top_k is None or self.metric is None):
            example = f"{setting_name('top_k', '3')} and {setting_name('metric', 'eval_ja_loss')}"
            raise ValueError(f"run_dir needs top_k and metric (e.g. {example})")
        if not self.checkpoints and self.run_dir is None:
            raise ValueError(
                f"no checkpoints: set {setting_name('checkpoints', '[DIR, ...]')} or {setting_name('run_dir', 'DIR')} "
                f"with {setting_name('top_k', 'K')} and {setting_name('metric', 'NAME')}"
            )
        if self.output is None and not self.dry_run:
            raise ValueError(
                f"no output folder: set {setting_name('output', 'DIR')} (or {setting_name('dry_run')} to only print "
                "the plan)"
            )
        return self


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``overrides``; ``params`` is merged entry by entry instead of replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        if key == "params" and isinstance(merged.get("params"), dict):
            merged["params"] = {**merged["params"], **value}
        else:
            merged[key] = value
    return merged
