"""Import paths of the 0.1 layout, kept working for one release with a :class:`DeprecationWarning`.

Why: user scripts and the earlier README import e.g. ``obim_trainer.merge``; the modules now live
in ``settings/``, ``pipeline/`` and ``training/``. Importing an old path returns the new module
itself (the same object, so monkeypatching either name patches both) and warns once per path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    "obim_trainer.config": "obim_trainer.settings.merge",
    "obim_trainer.callback_config": "obim_trainer.settings.callback",
    "obim_trainer.yaml_config": "obim_trainer.settings.yaml_files",
    "obim_trainer.setting_names": "obim_trainer.settings.names",
    "obim_trainer.merge": "obim_trainer.pipeline.merge",
    "obim_trainer.engine": "obim_trainer.pipeline.engine",
    "obim_trainer.model_layout": "obim_trainer.pipeline.layout",
    "obim_trainer.manifest": "obim_trainer.pipeline.manifest",
    "obim_trainer.variants": "obim_trainer.pipeline.variants",
    "obim_trainer.merge_comparison": "obim_trainer.pipeline.compare",
    "obim_trainer.merge_statistics": "obim_trainer.pipeline.statistics",
    "obim_trainer.sequential_regmean": "obim_trainer.pipeline.sequential_regmean",
    "obim_trainer.merging.selection": "obim_trainer.merging.topk",
    "obim_trainer.comparison": "obim_trainer.evaluation.comparison",
    "obim_trainer.callback": "obim_trainer.training.callback",
    "obim_trainer.selectors": "obim_trainer.training.selectors",
    "obim_trainer.checkpoint_guard": "obim_trainer.training.checkpoint_guard",
    "obim_trainer.training_data": "obim_trainer.training.text",
    "obim_trainer.selection": "obim_trainer.training.run_dir",
    "obim_trainer.user_cache": "obim_trainer._user_cache",
    "obim_trainer.package_versions": "obim_trainer._user_cache",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths in :data:`MOVED` and loads them as their new module."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old import path goes in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: :meth:`create_module` returned the already imported new module."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
