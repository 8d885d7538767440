"""obim-trainer: Optimal Brain Iterative Merging for continued pre-training (arXiv 2502.12217).

The public API is imported lazily so that ``import obim_trainer`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from obim_trainer import _moved

__version__ = "0.1.0"

_LAZY = {
    "OBIMCallback": "obim_trainer.training.callback",
    "OBIMConfig": "obim_trainer.settings.callback",
    "merge_checkpoints": "obim_trainer.pipeline.merge",
    "MergeResult": "obim_trainer.pipeline.merge",
    "MergeConfig": "obim_trainer.settings.merge",
    "available_methods": "obim_trainer.merging",
    "register_method": "obim_trainer.merging",
    "MergeMethod": "obim_trainer.merging",
}

__all__ = [
    "MergeConfig",
    "MergeMethod",
    "MergeResult",
    "OBIMCallback",
    "OBIMConfig",
    "available_methods",
    "merge_checkpoints",
    "register_method",
]

if TYPE_CHECKING:
    from obim_trainer.merging import MergeMethod, available_methods, register_method
    from obim_trainer.pipeline.merge import MergeResult, merge_checkpoints
    from obim_trainer.settings.callback import OBIMConfig
    from obim_trainer.settings.merge import MergeConfig
    from obim_trainer.training.callback import OBIMCallback

_moved.install()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'obim_trainer' has no attribute {name!r}")
