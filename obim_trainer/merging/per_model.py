"""Per-checkpoint parameters given as one number for all or one number each (mergekit's convention).

mergekit sets ``weight``, ``density``, ``gamma`` and ``epsilon`` per model; a YAML or ``--param``
value here is either a single number (every checkpoint) or a list in checkpoint order.
"""

from __future__ import annotations

from collections.abc import Sequence

from obim_trainer.errors import ConfigError

PerModel = float | list[float]
"""Type of a per-checkpoint parameter in a method's ``Params``."""


def per_model(value: float | Sequence[float], num_models: int, name: str, method: str) -> list[float]:
    """``value`` broadcast to K numbers; a list must have exactly K entries.

    Raises:
        ConfigError: The list does not have one entry per checkpoint.
    """
    if isinstance(value, (int, float)):
        return [float(value)] * num_models
    values = [float(v) for v in value]
    if len(values) != num_models:
        raise ConfigError(
            f"{method}: {name} has {len(values)} value(s) {values} but there are {num_models} checkpoints; "
            f"give one number for all (e.g. {name}: {values[0] if values else 1.0}) or one per checkpoint, "
            "in checkpoint order"
        )
    return values


def check_fractions(values: Sequence[float], name: str, method: str) -> None:
    """Shares of a tensor (densities, gamma) must lie in [0, 1]."""
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise ConfigError(f"{method}: every {name} must lie in [0, 1] (a share of each tensor), got {list(values)}")
