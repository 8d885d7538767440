"""Errors in the user's words: a setting named as the flag, the YAML key or the keyword argument.

The same setting is written ``--calibration-data`` on the command line, ``calibration_data:`` in a YAML
file and ``calibration_data=...`` in Python. ``obim-merge-ckpts`` says which for the duration of a
run (:func:`settings_spelled`); a message asks :func:`setting_name` and tells the user what to change
where they wrote it. Keys read from a ``--config`` file stay YAML keys there.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Literal

import yaml

Spelling = Literal["cli", "yaml", "python"]

FLAGS = {
    "total_shares": "--total-share",
    "params": "--param",
    "sweep": "--param",
    "new_languages": "--new-language",
    "methods": "--method",
}
"""Flags not spelled ``--`` + the field with hyphens."""
LIST_SEPARATORS = {"total_shares": ",", "methods": ","}
"""Flags that take their list as one comma-separated word (``--total-share 1.0,0.6``) instead of several."""
NEGATED = frozenset({"progress", "eval_checkpoints"})
"""Settings that default to on: their flag turns them off (``--no-progress``)."""
PER_LANGUAGE_CALIBRATION = {"calibration_data": {"en": "en.jsonl", "zh": "zh.jsonl"}, "new_languages": ["zh"]}
"""Per-language calibration with the new language named: the example errors give (:func:`settings_example`)."""
SWITCHES = frozenset({"overwrite", "dry_run", "evaluate", "recompute_stats"})
"""Settings that are a bare flag on the command line and ``true`` elsewhere."""


@dataclass(frozen=True)
class _Source:
    spelling: Spelling = "python"
    yaml_keys: Collection[str] = field(default_factory=frozenset)
    """Keys a ``--config`` file set (and no flag overrode): named as YAML keys even on the command line."""
    renamed: Mapping[str, str] = field(default_factory=dict)
    """Settings this source calls otherwise (the callback's ``base_model`` for ``base``)."""


_SOURCE: ContextVar[_Source | None] = ContextVar("obim_setting_source", default=None)


@contextmanager
def settings_spelled(
    spelling: Spelling, yaml_keys: Collection[str] = (), renamed: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Within the block, :func:`setting_name` spells settings as ``spelling`` (YAML for ``yaml_keys``), under
    their ``renamed`` names."""
    token = _SOURCE.set(_Source(spelling, frozenset(yaml_keys), dict(renamed or {})))
    try:
        yield
    finally:
        _SOURCE.reset(token)


def setting_name(name: str, value: str | Mapping[str, Any] | Sequence[Any] = "") -> str:
    """``name`` (a :class:`~obim_trainer.settings.merge.MergeConfig` field) as the user sets it, with an example
    ``value``: ``--top-k 3``, ``top_k: 3`` or ``top_k=3``. A mapping or list ``value`` is written the same way:
    ``--calibration-data en=a.jsonl zh=b.jsonl``, ``calibration_data: {en: a.jsonl, zh: b.jsonl}``,
    ``calibration_data={'en': 'a.jsonl', 'zh': 'b.jsonl'}``."""
    source = _SOURCE.get() or _Source()
    name = source.renamed.get(name, name)
    if not isinstance(value, str):
        value = _value_text(name, value, "yaml" if name in source.yaml_keys else source.spelling)
    if name in SWITCHES:
        value = "True" if source.spelling == "python" and name not in source.yaml_keys else "true"
    if source.spelling == "yaml" or name in source.yaml_keys:
        return f"{name}: {value}".rstrip()
    if source.spelling == "cli":
        return flag_of(name) if name in SWITCHES else f"{flag_of(name)} {value}".rstrip()
    return f"{name}={value or '...'}"


def spelling() -> Spelling:
    """How settings are spelled where the caller is: ``cli``, ``yaml`` or ``python`` (outside any run)."""
    return (_SOURCE.get() or _Source()).spelling


def setting_key(name: str) -> str:
    """The setting ``name`` alone as the user writes it: ``--calibration-data`` on the command line, else the
    key (``calibration_data``)."""
    source = _SOURCE.get() or _Source()
    name = source.renamed.get(name, name)
    return flag_of(name) if source.spelling == "cli" and name not in source.yaml_keys else name


def settings_example(values: Mapping[str, Any]) -> str:
    """Several settings given together: ``--a 1 --b 2``, ``a: 1, b: 2`` or ``a=1, b=2``."""
    source = _SOURCE.get() or _Source()
    return (" " if source.spelling == "cli" else ", ").join(setting_name(k, v) for k, v in values.items())


def _value_text(name: str, value: Mapping[str, Any] | Sequence[Any], spelling: Spelling) -> str:
    value = {k: _plain(v) for k, v in value.items()} if isinstance(value, Mapping) else [_plain(v) for v in value]
    if spelling == "yaml":
        return yaml.safe_dump(value if isinstance(value, Mapping) else list(value), default_flow_style=True).strip()
    if spelling == "python":
        return repr(dict(value) if isinstance(value, Mapping) else list(value))
    if isinstance(value, Mapping):  # LANG=FILE pairs, or --param KEY=V1,V2
        return " ".join(
            f"{key}={','.join(map(str, item)) if isinstance(item, list) else item}" for key, item in value.items()
        )
    return LIST_SEPARATORS.get(name, " ").join(str(item) for item in value)


def _plain(item: Any) -> Any:
    """A path as the text the user typed (``repr`` would say ``PosixPath(...)``)."""
    return str(item) if isinstance(item, PurePath) else item


def flag_of(name: str) -> str:
    """The ``obim-merge-ckpts`` flag of the setting ``name``: ``--top-k``, ``--total-share``, ``--no-progress``."""
    if name in NEGATED:
        return "--no-" + name.replace("_", "-")
    return FLAGS.get(name, "--" + name.replace("_", "-"))
