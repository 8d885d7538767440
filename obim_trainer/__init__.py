"""obim-trainer: Optimal Brain Iterative Merging for continued pre-training (arXiv 2502.12217).

The public API is imported lazily so that ``import obim_trainer`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "OBIMCallback": "obim_trainer.callback",
    "OBIMConfig": "obim_trainer.callback_config",
    "merge_checkpoints": "obim_trainer.merge",
    "MergeResult": "obim_trainer.merge",
    "MergeConfig": "obim_trainer.config",
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
    from obim_trainer.callback import OBIMCallback
    from obim_trainer.callback_config import OBIMConfig
    from obim_trainer.config import MergeConfig
    from obim_trainer.merge import MergeResult, merge_checkpoints
    from obim_trainer.merging import MergeMethod, available_methods, register_method


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'obim_trainer' has no attribute {name!r}")
