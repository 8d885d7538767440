"""Pure tensor math for merging: one module per method, chosen by name through the registry.

Nothing here reads files, builds models or talks to other processes. The registry imports the
built-in method modules (and plugins) the first time a method is looked up.
"""

from obim_trainer.merging.registry import (
    MergeMethod,
    MethodParams,
    available_methods,
    build_method,
    get_method,
    register_method,
)
from obim_trainer.merging.task import MergeOutput, ParamKind, TensorTask, Workspace

__all__ = [
    "MergeMethod",
    "MergeOutput",
    "MethodParams",
    "ParamKind",
    "TensorTask",
    "Workspace",
    "available_methods",
    "build_method",
    "get_method",
    "register_method",
]
