"""The registry of merge methods.

A method is a :class:`MergeMethod` subclass with a name, a pydantic ``Params``
model (the parameters users set from the CLI, YAML or Python, with mergekit's
names where mergekit has them), and a ``merge`` that turns one
:class:`~obim_trainer.merging.task.TensorTask` into one tensor.

Built-in methods register themselves with :func:`register_method` when
``obim_trainer.merging`` is imported. Other packages add methods through the
entry-point group ``obim_trainer.methods``; each entry point names a
``MergeMethod`` subclass (or a module that registers some on import).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from obim_trainer.errors import ConfigError
from obim_trainer.merging.task import MergeOutput, TensorTask
from obim_trainer.settings.yaml_files import format_validation_error

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "obim_trainer.methods"


@dataclass(frozen=True)
class StatisticsNeeds:
    """Which calibration statistics a method reads, and on which text each model is measured.

    Attributes:
        activations: Σx² per input feature of every linear map (``TensorTask.input_sq_mean``, OBM saliency),
            each checkpoint on the calibration text.
        grams: Input Grams G = XᵀX/n of every linear map (``TensorTask.base_gram``/``checkpoint_grams``).
        fishers: Diagonal empirical Fisher of every parameter (``TensorTask.base_fisher``/``checkpoint_fishers``).
        per_language: The base is measured on old-language text and each checkpoint on new-language text
            (calibration given per language, some named new). False: every model on all the calibration text.
        sequential: The method merges the whole model in forward order, measuring each layer's inputs on
            the partially merged model as it goes (sequential RegMean): it needs the calibration text itself,
            no cached statistics, and the merge runs as one model-level pass instead of tensor by tensor.
    """

    activations: bool = False
    grams: bool = False
    fishers: bool = False
    per_language: bool = False
    sequential: bool = False

    @property
    def any(self) -> bool:
        """Whether the method needs calibration text at all."""
        return self.activations or self.grams or self.fishers or self.sequential


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown names are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MergeMethod(ABC):
    """A merge method: pure tensor math on one :class:`TensorTask` at a time.

    Subclasses set ``name``, ``Params`` and ``summary``, may override
    :meth:`validate_for` to check parameters against the number of checkpoints,
    and implement :meth:`merge`.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    needs_activation_stats: ClassVar[bool] = False
    """True when the method reads ``TensorTask.input_sq_mean`` (the engine then runs calibration)."""
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None

    def __init__(self, params: MethodParams | Mapping[str, Any] | None = None, *, num_models: int) -> None:
        self.params = params if isinstance(params, self.Params) else parse_params(self, params or {})
        self.num_models = num_models
        self._check_model_count()
        self.validate_for(num_models)

    def _check_model_count(self) -> None:
        k = self.num_models
        if k < self.min_models or (self.max_models is not None and k > self.max_models):
            wanted = (
                f"exactly {self.min_models}"
                if self.max_models == self.min_models
                else f"at least {self.min_models}"
                + (f" and at most {self.max_models}" if self.max_models is not None else "")
            )
            raise ConfigError(f"method '{self.name}' needs {wanted} checkpoint(s), got {k}.")

    def statistics(self) -> StatisticsNeeds:
        """The statistics this method, with its parameters, reads (the engine computes only these)."""
        return StatisticsNeeds(activations=self.needs_activation_stats)

    def validate_for(self, num_models: int) -> None:  # noqa: B027 - optional hook
        """Check parameters that depend on K; raise :class:`ConfigError` with the fix."""

    @abstractmethod
    def merge(self, task: TensorTask) -> MergeOutput:
        """Merge one tensor. Return float32 on ``task.device``."""

    def joint_key(self, block_index: int | None) -> Hashable | None:
        """What this method's merge of a tensor of block ``block_index`` shares with other merges of it.

        The merges of one tensor (a sweep's, over the same inputs and statistics) whose methods give the
        same key are made by one :meth:`merge_together` call, e.g. OBIM at several shares, which scores
        each checkpoint once for all. ``None`` (the default): this method merges alone.
        """
        return None

    def merge_together(self, task: TensorTask, methods: Sequence[MergeMethod]) -> list[MergeOutput]:
        """The merges of ``task`` by ``methods`` (this one first; all with this one's :meth:`joint_key`), each
        equal to its own :meth:`merge`. Only called where :meth:`joint_key` is not ``None``."""
        raise NotImplementedError(f"method '{self.name}' merges alone (its joint_key is None)")

    def describe_tensor(self, block_index: int | None) -> str:
        """A short note on how a tensor of block ``block_index`` is merged (shown by ``--dry-run``)."""
        return ""

    def describe(self) -> dict[str, Any]:
        """Parameters as recorded in ``obim_merge.json``."""
        return {"method": self.name, **self.params.model_dump(mode="json", by_alias=True)}


def user_param_names(method: type[MergeMethod] | MergeMethod) -> list[str]:
    """Parameter names as a user writes them (``lambda``, the alias, not the Python field ``lambda_``)."""
    return [field.alias or name for name, field in method.Params.model_fields.items()]


def parse_params(method: type[MergeMethod] | MergeMethod, raw: Mapping[str, Any]) -> MethodParams:
    """Validate raw parameters, turning pydantic's report into one readable :class:`ConfigError`."""
    try:
        return method.Params.model_validate(dict(raw))
    except ValidationError as exc:
        known = user_param_names(method)
        what = f"parameters for method '{method.name}'"
        raise ConfigError(
            f"{format_validation_error(exc, what, known)}. Parameters it accepts: {', '.join(known) or 'none'}."
        ) from None


BUILT_IN_MODULES = (
    "obim",
    "ablations",
    "average",
    "breadcrumbs",
    "consensus",
    "dare",
    "della",
    "fisher_merging",
    "lines",
    "magmax",
    "model_stock",
    "pcb",
    "regmean",
    "slerp",
    "task_arithmetic",
    "ties",
    "widen",
)

_REGISTRY: dict[str, type[MergeMethod]] = {}
_entry_points_loaded = False


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator that adds a method to the registry under ``cls.name``."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ConfigError(f"two merge methods are both named '{cls.name}': {existing} and {cls}.")
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for module in BUILT_IN_MODULES:
        import_module(f"obim_trainer.merging.{module}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as exc:  # a broken plugin must not break the built-in methods
            logger.warning("could not load merge method plugin %r (%s): %s", ep.name, ep.value, exc)
            continue
        if isinstance(loaded, type) and issubclass(loaded, MergeMethod):
            register_method(loaded)


def available_methods() -> dict[str, type[MergeMethod]]:
    """Every registered method by name, plugins included, sorted by name."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[MergeMethod]:
    """The method class registered as ``name``; a :class:`ConfigError` listing the choices if none is."""
    methods = available_methods()
    try:
        return methods[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge method '{name}'. Available: {', '.join(methods)}. "
            "Run `obim-merge-ckpts --list-methods` for their parameters."
        ) from None


def build_method(name: str, params: Mapping[str, Any] | None, num_models: int) -> MergeMethod:
    """Look up, validate and instantiate a method for K = ``num_models`` checkpoints."""
    return get_method(name)(params or {}, num_models=num_models)
