"""Pure tensor math for merging: one module per method, chosen by name through the registry.

Nothing here reads files, builds models or talks to other processes.
"""

# Built-in methods register themselves on import.
from obim_trainer.merging import obim  # noqa: F401
from obim_trainer.merging.registry import (
    MergeMethod,
    MethodParams,
    available_methods,
    build_method,
    get_method,
    register_method,
)
from obim_trainer.merging.task import MergeOutput, ParamKind, TensorTask

__all__ = [
    "MergeMethod",
    "MergeOutput",
    "MethodParams",
    "ParamKind",
    "TensorTask",
    "available_methods",
    "build_method",
    "get_method",
    "register_method",
]
