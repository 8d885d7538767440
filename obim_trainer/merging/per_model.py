"""Per-checkpoint parameters given as one number for all or one number each (mergekit's convention)."""

from __future__ import annotations

from collections.abc import Sequence

from obim_trainer.errors import ConfigError


def per_model(value: float | Sequence[float], num_models: int, name: str, method: str) -> list[float]:
    """``value`` broadcast to K numbers; a list must have exactly K entries."""
    if isinstance(value, (int, float)):
        return [float(value)] * num_models
    values = [float(v) for v in value]
    if len(values) != num_models:
        raise ConfigError(
            f"{method}: {name} has {len(values)} value(s) but there are {num_models} checkpoints; "
            f"give one number for all or one per checkpoint"
        )
    return values
