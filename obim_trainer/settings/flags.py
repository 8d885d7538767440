"""Command-line flags generated from settings fields: name, help, choices, type, nargs and default.

A flag of ``obim-merge-ckpts`` is the field of a settings block (:mod:`~obim_trainer.settings.blocks`)
spelled by :func:`~obim_trainer.settings.names.flag_of`; its help is the field's description (other
settings, written ```name``` there, shown as their flags) with the default; a ``Literal`` gives the
choices, a list ``nargs="+"``, a ``bool`` a switch. Flags with a parser of their own (``--param k=v``,
``--eval-data LANG=FILE``) pass it as an override and still take their help from the field.
"""

from __future__ import annotations

import argparse
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from obim_trainer.settings.names import flag_of

METAVARS: dict[type, str] = {int: "N", float: "X", Path: "DIR"}
"""How ``--help`` shows the value of a number or path flag (files override ``DIR``)."""
NEGATED_HELP = "Turn off (on by default):"
"""What a ``--no-…`` flag's help says before the description of the setting it turns off."""


def describe(text: str) -> str:
    """``text`` with each ```setting``` reference spelled as its flag (``--top-k``)."""
    return re.sub(r"`(\w+)`", lambda match: flag_of(match.group(1)), text)


def default_text(field: FieldInfo) -> str:
    """`` (default X)`` for a field with a default worth printing (not None, empty or a switch)."""
    if field.is_required():
        return ""
    value = field.get_default(call_default_factory=True)
    if value is None or value == [] or value == {} or isinstance(value, bool | BaseModel):
        return ""
    return f" (default {value})"


def help_text(model: type[BaseModel], name: str, before: str = "", after: str = "") -> str:
    """The flag's help: ``before``, the field's description, ``after``, its default (escaped for argparse)."""
    field = model.model_fields[name]
    text = " ".join(part for part in (before, describe(field.description or ""), after) if part)
    return (text + default_text(field)).replace("%", "%%")


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        kept = [arg for arg in get_args(annotation) if arg is not type(None)]
        return kept[0] if len(kept) == 1 else annotation
    return annotation


def parsing_of(field: FieldInfo) -> dict[str, Any]:
    """``add_argument`` options the field's type implies: a switch for a bool, ``nargs`` for a list,
    ``choices`` for a Literal, ``type`` for numbers and paths (strings and unions stay strings)."""
    annotation = _without_none(field.annotation)
    if annotation is bool:
        return {"action": "store_false" if field.default else "store_true"}
    options: dict[str, Any] = {}
    if get_origin(annotation) is list:
        options["nargs"] = "+"
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is Literal:
        options["choices"] = list(get_args(annotation))
    elif annotation in METAVARS:
        options |= {"type": annotation, "metavar": METAVARS[annotation]}
    return options


def add_setting(
    group: argparse._ActionsContainer,
    model: type[BaseModel],
    name: str,
    *,
    flag: str | None = None,
    before: str = "",
    after: str = "",
    **overrides: Any,
) -> None:
    """Add the flag of ``model``'s field ``name`` to ``group`` (``overrides``: hand-written parsing)."""
    field = model.model_fields[name]
    options = {"dest": name, **parsing_of(field), **overrides}
    if options.get("action") == "store_false" and not (flag or flag_of(name)).startswith("--no-"):
        raise TypeError(f"{name} defaults to true: add it to names.NEGATED so its flag reads --no-…")
    if options.get("action") == "store_false":
        before = f"{NEGATED_HELP} {before}".strip()
    group.add_argument(flag or flag_of(name), help=help_text(model, name, before, after), **options)
