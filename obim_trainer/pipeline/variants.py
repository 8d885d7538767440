"""Several merges of the same checkpoints in one go: methods side by side, OBIM's total-share sweep and
sweeps of any parameter.

The paper fixes n_k = 1/K, so every position takes some checkpoint's delta. Keeping part of the
base (Σ n_k < 1) trades new-language gain for old-language recovery; a sweep over the total share
Σ n_k = s merges at each s, splitting s between the checkpoints as the ratios say
(n_k = s · r_k / Σ r, with r_k = 1 by default), so users see the trade-off instead of guessing it.

Any other parameter is swept the same way (``--param base_weight=0.3,1,3``, YAML ``sweep:
{base_weight: [0.3, 1, 3]}``): one merge per value for every listed method that has the parameter,
the product of the values when several are swept, named ``regmean@base_weight=1`` (after the total
share when both are swept: ``obim@0.6@gamma=2``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from obim_trainer.errors import ConfigError
from obim_trainer.merging import build_method, get_method
from obim_trainer.settings.merge import MergeConfig
from obim_trainer.settings.names import setting_name

if TYPE_CHECKING:
    from obim_trainer.pipeline.merge import MergeResult

logger = logging.getLogger(__name__)

SHARED_PARAM = "ratios"


@dataclass(frozen=True)
class MergeVariant:
    """One merge to make: a method, its parameters and the folder name it is written under."""

    name: str
    method: str
    params: dict[str, Any]
    total_share: float | None = None
    swept: dict[str, Any] | None = None
    """The swept parameters' values of this merge, by the name they were swept under."""


def accepts_total_share(method: str) -> bool:
    """Whether the method has per-checkpoint shares n_k (OBIM and the iterative ablations)."""
    return SHARED_PARAM in get_method(method).Params.model_fields


def format_value(value: Any) -> str:
    """A swept value as it appears in a folder name: numbers as ``%g`` (1.0 → 1), the rest as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return f"{value:g}"


def variant_name(method: str, total_share: float | None, swept: Mapping[str, Any] | None = None) -> str:
    """``obim`` for the paper's Σ n_k = 1 (or no sweep), ``obim@0.6`` for a smaller total share,
    ``regmean@base_weight=1`` (``@alpha=0.9,base_weight=1`` for several) for swept parameters."""
    name = method if total_share is None or total_share == 1.0 else f"{method}@{total_share:g}"
    if swept:
        name += "@" + ",".join(f"{key}={format_value(value)}" for key, value in swept.items())
    return name


def _accepted_names(method: str) -> set[str]:
    fields = get_method(method).Params.model_fields
    return set(fields) | {f.alias for f in fields.values() if f.alias}


def _method_sweeps(method: str, sweeps: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the swept values of the parameters ``method`` has ([{}]: none swept)."""
    own = {key: list(values) for key, values in sweeps.items() if key in _accepted_names(method)}
    return [dict(zip(own, combo, strict=True)) for combo in itertools.product(*own.values())]


def _check_sweeps(sweeps: Mapping[str, Sequence[Any]], methods: Sequence[str]) -> None:
    for key, values in sweeps.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            example = setting_name("sweep", {key: [0.3, 1, 3]})
            raise ConfigError(f"sweep of '{key}' needs a list of values, e.g. {example}, got {values!r}")
        if key == SHARED_PARAM:
            total = setting_name("total_shares", [1.0, 0.6])
            raise ConfigError(f"ratios cannot be swept value by value; sweep their total with {total}")
        if not any(key in _accepted_names(m) for m in methods):
            raise ConfigError(
                f"swept parameter '{key}' belongs to none of the methods {', '.join(methods)}; see "
                "`obim-merge-ckpts --list-methods`"
            )


def scaled_ratios(ratios: Sequence[float] | None, total_share: float, num_models: int) -> list[float]:
    """n_k = s · r_k / Σ r: the total share split as the ratios say (equally without ratios)."""
    weights = list(ratios) if ratios is not None else [1.0] * num_models
    total = math.fsum(weights)
    if len(weights) != num_models or total <= 0:
        raise ConfigError(
            f"ratios {weights} cannot be scaled to a total share for {num_models} checkpoints; give one positive "
            "ratio per checkpoint or none"
        )
    return [total_share * w / total for w in weights]


def method_params(method: str, params: Mapping[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """The parameters of ``method``: ``params[method]`` when it is a mapping, plus the shared
    top-level parameters the method declares (``density`` goes to ties and dare_ties, not to obim)."""
    own = dict(params.get(method) or {}) if isinstance(params.get(method), Mapping) else {}
    accepted = _accepted_names(method)
    shared = {k: v for k, v in params.items() if k not in methods and k in accepted}
    return {**shared, **own}


def _check_params_used(params: Mapping[str, Any], methods: Sequence[str]) -> None:
    for key in params:
        if key in methods:
            continue
        if not any(key in method_params(m, {key: None}, methods) for m in methods):
            raise ConfigError(
                f"parameter '{key}' belongs to none of the methods {', '.join(methods)}; see "
                "`obim-merge-ckpts --list-methods`, or give it per method as params: {method: {key: value}}"
            )


def plan_variants(
    methods: Sequence[str],
    params: Mapping[str, Any],
    total_shares: Sequence[float] | None,
    num_models: int,
    sweeps: Mapping[str, Sequence[Any]] | None = None,
) -> list[MergeVariant]:
    """Every (method, total share, swept values) to merge, in order; shares apply to the methods that have
    n_k, each swept parameter to the methods that have it (the product of the values when several are).

    Raises :class:`ConfigError` for unknown methods, duplicate names, shares outside (0, 1], parameters
    no method takes and sweeps without values.
    """
    if not methods:
        raise ConfigError(f"no merge method given; name at least one, e.g. {setting_name('methods', ['obim', 'ties'])}")
    for share in total_shares or []:
        if not 0.0 < share <= 1.0:
            raise ConfigError(f"total share {share} must lie in (0, 1]: it is Σ n_k, the part of each tensor merged")
    _check_params_used(params, methods)
    sweeps = sweeps or {}
    _check_sweeps(sweeps, methods)
    variants: list[MergeVariant] = []
    for method in methods:
        own = method_params(method, params, methods)
        shares: list[float | None] = [None]
        if total_shares and accepts_total_share(method):
            shares = list(total_shares)
        elif total_shares:
            logger.info("%s has no per-checkpoint shares; merged once, not per total share", method)
        for share in shares:
            shared = (
                own if share is None else {**own, SHARED_PARAM: scaled_ratios(own.get(SHARED_PARAM), share, num_models)}
            )
            for swept in _method_sweeps(method, sweeps):
                name = variant_name(method, share, swept)
                variants.append(MergeVariant(name, method, {**shared, **swept}, share, swept or None))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"merges would share a folder name ({', '.join(names)}); list each method and share once")
    for variant in variants:  # a bad value fails now, not after the merges before it were written
        build_method(variant.method, variant.params, num_models)
    return variants


class MergeSpec(BaseModel):
    """One entry of a list of merges (the demo's ``merges:``, the callback's ``merges:``): a method, its
    parameters and what is swept.

    Every merge of one entry forms one family (its ``label``, default the method's name), e.g.
    ``{method: regmean, sweep: {base_weight: [0.3, 1, 3]}}`` or OBIM over ``total_shares``. ``label``
    also names the merges' folders in place of the method (``regmean-parallel@base_weight=1``), so one
    method can appear with different fixed parameters.
    """

    model_config = ConfigDict(extra="forbid")

    method: str
    label: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.+-]+$", description="Family and folder name.")
    params: dict[str, Any] = Field(default_factory=dict, description="Fixed parameters of every merge of the entry.")
    total_shares: list[float] | None = Field(default=None, description="OBIM-style Σn_k values, one merge each.")
    sweep: dict[str, list[Any]] = Field(default_factory=dict, description="One merge per value (product if several).")
    calibration_samples: int | None = Field(
        default=None, ge=1, description="Calibration texts per language for these merges (default: the run's)."
    )

    @property
    def family(self) -> str:
        """The family the entry's merges form (and the prefix of their names)."""
        return self.label or self.method

    def plan(self, num_models: int) -> list[MergeVariant]:
        """The entry's merges, named ``<family>[@share][@param=value]``."""
        variants = plan_variants(
            [self.method], {self.method: self.params}, self.total_shares, num_models, self.sweep or None
        )
        return [dataclasses.replace(v, name=self.family + v.name[len(self.method) :]) for v in variants]


DEFAULT_BASE_WEIGHTS = [0.3, 1, 3]
"""RegMean's c in the default candidates: the base's old-language outputs weighted 0.3×, 1× and 3× the
checkpoints' new-language ones (Eq. 2 of RegMean with the base as one more model)."""


def default_candidates(configured: MergeSpec | None = None) -> list[MergeSpec]:
    """The merges compared by default when the calibration names a new language: OBIM as published
    (n_k = 1/K), sequential RegMean at ``base_weight`` 0.3, 1 and 3, and the configured merge beside them.

    One list for the callback and ``obim-merge-ckpts``: with a new language, a per-layer least-squares
    merge can keep the old languages where OBIM's hard ownership cannot, and which one wins is measured,
    not assumed. The configured merge gets the label ``configured`` when it is not one of the defaults.
    """
    specs = [MergeSpec(method="obim"), MergeSpec(method="regmean", sweep={"base_weight": DEFAULT_BASE_WEIGHTS})]
    if configured is not None and configured not in specs:
        taken = {s.family for s in specs}
        label = configured.family if configured.family not in taken else f"{configured.method}-configured"
        specs.append(configured.model_copy(update={"label": label}))
    return specs


def wants_default_candidates(calibration_data: Any, new_languages: Sequence[str]) -> bool:
    """Whether the calibration names a new language beside old ones given per language (the default
    candidates' RegMean measures the base on the old text and the checkpoints on the new)."""
    return isinstance(calibration_data, Mapping) and bool(new_languages)


def plan_specs(specs: Sequence[MergeSpec], num_models: int) -> list[MergeVariant]:
    """Every merge of every entry, in order; :class:`ConfigError` when two would share a folder name."""
    variants = [v for spec in specs for v in spec.plan(num_models)]
    names = [v.name for v in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"merges {', '.join(repeated)} appear twice; give one of the entries its own label")
    return variants


def merge_variants(
    config: MergeConfig,
    variants: Sequence[MergeVariant],
    output_root: Path,
    sweep: Callable[[Sequence[MergeConfig]], list[MergeResult]] | None = None,
) -> dict[str, MergeResult]:
    """Merge the same checkpoints once per variant into ``output_root/<name>``; each variant's result.

    ``sweep`` makes the merges, given one configuration per variant (default
    :func:`~obim_trainer.pipeline.merge.merge_sweep`; the callback passes
    :func:`~obim_trainer.pipeline.merge.merge_sweep_on_ranks`): each input tensor is read once for all of
    them, the bytes are those of separate merges, and the folders appear together at the end.
    """
    from obim_trainer.pipeline.merge import merge_sweep

    names = [variant.name for variant in variants]
    configs = [
        MergeConfig.build(
            {**config.model_dump(), "method": v.method, "params": v.params, "output": Path(output_root) / v.name}
        )
        for v in variants
    ]
    logger.info("merging %d variant(s) in one pass: %s", len(configs), ", ".join(names))
    return dict(zip(names, (sweep or merge_sweep)(configs), strict=True))
