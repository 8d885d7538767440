"""Errors in the user's words: a setting named as the flag, the YAML key or the keyword argument.

The same setting is written ``--calibration-data`` on the command line, ``calibration_data:`` in a YAML
file and ``calibration_data=...`` in Python. ``obim-merge-ckpts`` says which for the duration of a
run (:func:`settings_spelled`); a message asks :func:`setting_name` and tells the user what to change
where they wrote it. Keys read from a ``--config`` file stay YAML keys there.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

Spelling = Literal["cli", "yaml", "python"]

FLAGS = {"total_shares": "--total-share", "params": "--param", "new_languages": "--new-language"}
"""Flags not spelled ``--`` + the field with hyphens."""
NEGATED = frozenset({"progress", "eval_checkpoints"})
"""Settings that default to on: their flag turns them off (``--no-progress``)."""
SWITCHES = frozenset({"overwrite", "dry_run", "evaluate", "recompute_stats"})
"""Settings that are a bare flag on the command line and ``true`` elsewhere."""


@dataclass(frozen=True)
class _Source:
    spelling: Spelling = "python"
    yaml_keys: Collection[str] = field(default_factory=frozenset)
    """Keys a ``--config`` file set (and no flag overrode): named as YAML keys even on the command line."""


_SOURCE: ContextVar[_Source | None] = ContextVar("obim_setting_source", default=None)


@contextmanager
def settings_spelled(spelling: Spelling, yaml_keys: Collection[str] = ()) -> Iterator[None]:
    """Within the block, :func:`setting_name` spells settings as ``spelling`` (YAML for ``yaml_keys``)."""
    token = _SOURCE.set(_Source(spelling, frozenset(yaml_keys)))
    try:
        yield
    finally:
        _SOURCE.reset(token)


def setting_name(name: str, value: str = "") -> str:
    """``name`` (a :class:`~obim_trainer.settings.merge.MergeConfig` field) as the user sets it, with an example
    ``value``: ``--top-k 3``, ``top_k: 3`` or ``top_k=3``."""
    source = _SOURCE.get() or _Source()
    if name in SWITCHES:
        value = "True" if source.spelling == "python" and name not in source.yaml_keys else "true"
    if source.spelling == "yaml" or name in source.yaml_keys:
        return f"{name}: {value}".rstrip()
    if source.spelling == "cli":
        return flag_of(name) if name in SWITCHES else f"{flag_of(name)} {value}".rstrip()
    return f"{name}={value or '...'}"


def flag_of(name: str) -> str:
    """The ``obim-merge-ckpts`` flag of the setting ``name``: ``--top-k``, ``--total-share``, ``--no-progress``."""
    if name in NEGATED:
        return "--no-" + name.replace("_", "-")
    return FLAGS.get(name, "--" + name.replace("_", "-"))
