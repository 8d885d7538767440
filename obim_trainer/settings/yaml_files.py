"""Pydantic configurations read from YAML that fail with one :class:`ConfigError`, not a traceback.

Every configuration of the project (merge, comparison, callback, lm-eval, demo) validates
through :meth:`YamlConfig.build`, so a wrong key or value anywhere is reported the same way:
one line naming each offending key and what to change.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from obim_trainer.errors import ConfigError
from obim_trainer.settings.names import settings_spelled, spelling

_Config = TypeVar("_Config", bound="YamlConfig")
_Built = TypeVar("_Built")


def did_you_mean(key: str, accepted: Collection[str]) -> str:
    """`` (did you mean 'method'?)`` for the closest accepted spelling of a mistyped key, else ``""``."""
    close = difflib.get_close_matches(str(key), [str(a) for a in accepted], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def format_validation_error(exc: ValidationError, what: str, accepted: Collection[str] = ()) -> str:
    """``invalid <what>: key: message; ...``, one entry per error pydantic found; an unknown top-level
    key gets the closest of ``accepted`` as a suggestion."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
            msg += did_you_mean(loc, accepted)
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"invalid {what}: " + "; ".join(parts)


def check_keys(values: Mapping[str, Any], accepted: Collection[str], source: str) -> None:
    """Refuse a key of a plain YAML section (the example's ``data:`` or top level) that nothing reads,
    with a close-match suggestion: a typo there would otherwise be ignored silently."""
    unknown = sorted(str(key) for key in values if key not in accepted)
    if unknown:
        named = ", ".join(f"'{key}'{did_you_mean(key, accepted)}" for key in unknown)
        raise ConfigError(f"{source}: unknown key(s) {named}; accepted keys: {', '.join(sorted(accepted))}")


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML configuration into a plain dict; relative paths stay relative to the caller's cwd."""
    path = Path(path)
    if not path.is_file():
        where = " to --config" if spelling() == "cli" else ""
        raise ConfigError(f"config file {path} does not exist; give an existing YAML file{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def section_of(path: str | Path, section: str) -> str:
    """How an error names one top-level section of a YAML file: ``config.yaml, section 'training:'``."""
    return f"{path}, section '{section}:'"


def build_from_keywords(target: Callable[..., _Built], values: Mapping[str, Any], source: str) -> _Built:
    """``target(**values)`` for a section that belongs to another library (``TrainingArguments``), with
    an unknown key or a rejected value reported as one :class:`ConfigError` naming ``source`` and the key.

    Unknown keys are checked against ``target``'s signature first: a key a newer or older version of that
    library does not know (``overwrite_output_dir`` in transformers 5) would otherwise be a TypeError traceback.
    """
    name = getattr(target, "__name__", str(target))
    accepted = inspect.signature(target).parameters
    unknown = sorted(str(key) for key in values if key not in accepted)
    if unknown:
        named = ", ".join(f"'{key}'{did_you_mean(key, accepted)}" for key in unknown)
        raise ConfigError(
            f"{source}: {name} does not accept {named}; "
            f"remove or rename {'it' if len(unknown) == 1 else 'them'} (check the spelling and the installed version)"
        )
    try:
        return target(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: invalid {name} settings: {exc}") from None


class YamlConfig(BaseModel):
    """A configuration with :meth:`build` (from a mapping) and :meth:`from_yaml` (from a file)."""

    described_as: ClassVar[str] = "configuration"
    """What the error message calls it: ``invalid <described_as>: ...``."""

    @classmethod
    def build(cls: type[_Config], values: Mapping[str, Any], source: str | Path | None = None) -> _Config:
        """Validate ``values``, turning pydantic's report into one :class:`ConfigError` (naming ``source``)."""
        what = cls.described_as if source is None else f"{cls.described_as} {source}"
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, what, cls.model_fields)) from None

    @classmethod
    def from_yaml(cls: type[_Config], path: str | Path) -> _Config:
        """Read and validate a YAML file holding this configuration's keys (errors name YAML keys)."""
        with settings_spelled("yaml"):
            return cls.build(load_yaml_config(path), source=path)


EXAMPLE_TOP_KEYS = ("model", "data", "training", "obim", "resume_from_checkpoint")
"""Top-level keys ``examples/continued_pretraining.py`` reads (layout of ``configs/callback/example.yaml``)."""
EXAMPLE_DATA_KEYS = ("train", "eval", "text_field", "block_size")
"""Keys of the example's ``data:`` section."""


def check_example_settings(settings: Mapping[str, Any], path: str | Path) -> None:
    """The example config's own keys (top level and ``data:``; ``training:`` and ``obim:`` are checked by
    what builds them) and its data files, each error naming the file, the section and the key."""
    check_keys(settings, EXAMPLE_TOP_KEYS, f"config {path}, top level")
    data = settings.get("data")
    if not isinstance(data, Mapping):
        return
    check_keys(data, EXAMPLE_DATA_KEYS, section_of(path, "data"))
    files = {"train": data.get("train"), **{f"eval.{k}": v for k, v in dict(data.get("eval") or {}).items()}}
    for key, file in files.items():
        if file is not None and not Path(str(file)).is_file():
            raise ConfigError(f"{section_of(path, 'data')}, key '{key}': data file {file} does not exist; fix the path")
